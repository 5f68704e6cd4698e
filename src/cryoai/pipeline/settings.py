"""The one boundary where the run's options (:class:`cryoai.training.config.TrainConfig`, their
one source, the policy included) become the typed settings of each stage's mechanisms.
"""

from __future__ import annotations

from dataclasses import replace

from ..physics.masks import map_mask_radius_px
from ..reconstruction import AssignSettings, SearchSettings, assign_settings
from ..reconstruction.junk_sorting import JunkSortSettings
from ..training.config import TrainConfig


def in_pixels(cfg: TrainConfig, box_px: int, pixel_size_a: float,
              source: str = "the particles") -> TrainConfig:
    """The options given in Angstrom turned into the box's units: ``particle_diameter_a`` into
    ``mask_radius_frac``, ``search_resolution_a`` into ``search_radius_end`` (frequency px).

    Raises
    ------
    InputError
        An Angstrom value the box cannot hold (a mask wider than the box, a resolution beyond
        Nyquist), naming ``source``.
    """
    from ..errors import InputError
    from ..physics.grids import max_paired_radius_px

    extent_a = box_px * pixel_size_a
    if cfg.particle_diameter_a is not None:
        frac = 0.5 * cfg.particle_diameter_a / extent_a
        if frac > 0.5:
            raise InputError(f"{source}: --particle-diameter-a {cfg.particle_diameter_a:g} is wider than "
                             f"the box ({extent_a:g} A)")
        cfg = replace(cfg, mask_radius_frac=round(frac, 6))
    if cfg.search_resolution_a is not None:
        radius_px = round(extent_a / cfg.search_resolution_a, 3)
        if radius_px > max_paired_radius_px(box_px) or radius_px <= cfg.search_radius_start:
            raise InputError(
                f"{source}: --search-resolution-a {cfg.search_resolution_a:g} is {radius_px:g} px in a box "
                f"of {box_px} px at {pixel_size_a:g} A: it must lie between the EM's first band "
                f"({cfg.search_radius_start:g} px, {extent_a / cfg.search_radius_start:.1f} A) and Nyquist "
                f"({2 * pixel_size_a:g} A)")
        cfg = replace(cfg, search_radius_end=radius_px)
    return cfg


def at_full_box(cfg: TrainConfig, working_box_px: int | None, box_px: int) -> TrainConfig:
    """The options for the stages at the full box of a run that searched at a working box: the
    global first guesses' shift grid (the junk stage's second look) in the same steps in
    Angstrom as at the working box (2 working px, not 2 full-box px: the same number of shifts
    over the same range in Angstrom, refined locally after).
    """
    if working_box_px is None or working_box_px >= box_px:
        return cfg
    return replace(cfg, search_shift_step_px=cfg.search_shift_step_px * box_px / working_box_px)


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
        refine_method=cfg.refine_method,
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
