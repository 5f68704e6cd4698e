"""The one boundary where the run's options (:class:`cryoai.training.config.TrainConfig`, their
one source, the policy included) become the typed settings of each stage's mechanisms.
"""

from __future__ import annotations

from dataclasses import replace

from ..physics.masks import map_mask_radius_px
from ..reconstruction import AssignSettings, SearchSettings, assign_settings
from ..reconstruction.junk_sorting import JunkSortSettings
from ..training.config import TrainConfig


def mask_radius_px(cfg: TrainConfig, box_px: int) -> float:
    """The radius (px) of the maps' soft spherical mask."""
    return map_mask_radius_px(box_px, cfg.mask_radius_frac)


def search_settings(cfg: TrainConfig, box_px: int) -> SearchSettings:
    """The pose search's settings (docs/pipeline.md#search-start)."""
    return SearchSettings(
        subset=cfg.search_subset,
        n_rotations=cfg.search_rotations,
        iterations=cfg.search_iterations,
        batch=cfg.search_batch,
        stop_posterior=cfg.search_stop_posterior,
        ema=cfg.search_ema,
        radius_start_px=cfg.search_radius_start,
        radius_end_px=cfg.search_radius_end,
        max_shift_px=(cfg.search_max_shift_px if cfg.search_max_shift_px is not None else 0.12 * box_px),
        shift_step_px=cfg.search_shift_step_px,
        refine_rounds=cfg.refine_rounds,
        refine_candidates=cfg.refine_candidates,
        refine_radius_frac=cfg.refine_radius_frac,
        class_radius_px=cfg.assign_radius_px,  # the 2D classes' in-plane first guesses: the same band
        images_per_class=cfg.policy.images_per_class,
        max_classes=cfg.policy.max_classes,
        class_search_seeds=cfg.policy.class_search_seeds,
        mask_radius_px=mask_radius_px(cfg, box_px),
        seed=cfg.seed,
    )


def assignment_settings(cfg: TrainConfig, box_px: int) -> AssignSettings:
    """How particles are posed against a run's map (the assignment stage, the junk stage's
    second look, predict-poses).
    """
    settings = assign_settings(
        search_settings(cfg, box_px),
        rounds=cfg.assign_refine_rounds,
        candidates=cfg.assign_refine_candidates,
        method=cfg.assign_refine_method,
        radius_frac=cfg.assign_refine_radius_frac,
        hypotheses=cfg.encoder_hypotheses,
        prune_keep=cfg.assign_prune_keep,
    )
    if cfg.assign_radius_px is not None:
        settings = replace(settings, radius_px=float(cfg.assign_radius_px))
    return settings


def junk_settings(cfg: TrainConfig) -> JunkSortSettings:
    """How the junk is called (docs/pipeline.md#junk)."""
    return JunkSortSettings(
        threshold=cfg.policy.junk_threshold,
        core_share=cfg.policy.junk_core_share,
        passes=cfg.junk_passes,
        max_shift_frac=cfg.junk_max_shift_frac,
    )
