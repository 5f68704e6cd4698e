"""The search stage (its start, attempts and acceptance) and the view balancing after it.

:func:`search_stage` runs the pose search (:mod:`cryoai.reconstruction.pose_search`) on its
subset, from a blob, from 2D class averages or from a given map, poses the subset afresh against
its map, measures how much of the subset's signal that map explains and how its views are
spread, and asks the policy (:func:`cryoai.pipeline.decisions.judge_attempt`) whether to keep
it and whether to search again. :func:`balance_views_stage` refines the kept subset's poses
against view-balanced maps where its views are preferred. docs/pipeline.md explains both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..errors import InputError
from ..evaluation.metrics import pose_agreement
from ..io.mrc import read_volume
from ..physics.fft import fourier_crop_3d, ifft3_c
from ..reconstruction import PoseAssigner, repose_classes, repose_subset, search_subset, starting_map
from ..reconstruction.particle_scores import explained_signal, score_spectra
from ..reconstruction.pose_search import Progress, SubsetSearch
from ..reconstruction.regularised import density_skewness
from ..reconstruction.view_balance import refine_balanced
from ..simulate.views import sampling_compensation_factor
from ..training.config import TrainConfig
from . import decisions
from .records import AttemptFigures, Particles, SearchRecord, StageRecord, ViewsRecord
from .settings import assignment_settings, mask_radius_px, search_settings
from .symmetry import wants_symmetry


def read_initial_map(path: str, box_px: int, pixel_size_a: float) -> np.ndarray:
    """The map of ``--initial-map``, checked against the particles: the same box, and the same
    voxel size within 1% where its header gives one (an unset one, 0, is taken as theirs). A
    map of the same extent at a larger (even) box, e.g. the particles' full box where the search
    works at a smaller one, is Fourier-cropped to ``box_px``.

    Raises
    ------
    InputError
        One line naming the file and the problem.
    """
    from ..errors import InputError

    volume, voxel_a = read_volume(path)
    n = volume.shape[-1]
    extent_a = box_px * pixel_size_a
    if n != box_px:
        same_extent = voxel_a <= 0 or abs(n * voxel_a - extent_a) <= 0.01 * extent_a
        if not (n > box_px and n % 2 == 0 and box_px % 2 == 0 and same_extent):
            raise InputError(
                f"{path}: box {n} differs from the particles' {box_px} "
                "(resample the map to their box first)"
            )
        volume = fourier_crop_3d(torch.as_tensor(volume, dtype=torch.float64), box_px).numpy()
        voxel_a = extent_a / box_px if voxel_a > 0 else voxel_a
    if voxel_a > 0 and abs(voxel_a - pixel_size_a) > 0.01 * pixel_size_a:
        raise InputError(
            f"{path}: voxel size {voxel_a:.3f} A differs from the particles' "
            f"{pixel_size_a:.3f} A (resample the map first)"
        )
    if not np.isfinite(volume).all() or float(np.abs(volume).max()) == 0:
        raise InputError(f"{path}: the map is empty or holds NaN/infinite values")
    return volume


def explained_share(particles: Particles, found: SubsetSearch, radius_px: float) -> float:
    """The share of the subset images' signal within ``radius_px`` that the search's map
    explains at their poses (NaN without a noise model).
    """
    noise = particles.dataset.noise
    if noise is None:
        return float("nan")
    if found.classes is None:
        groups = [(found.fourier_volume, slice(None))]
    else:  # each image against its own class's map
        groups = [(volume, torch.as_tensor(np.flatnonzero(found.classes == k), device=found.spectra.device))
                  for k, volume in enumerate(found.class_volumes)]
    scores = []
    for volume, rows in groups:
        score, _, _, _ = score_spectra(
            particles.formation,
            volume,
            found.spectra[rows],
            found.ctf[rows],
            found.rotations[rows],
            found.shifts_px[rows],
            radius_px,
        )
        scores.append(score.cpu().numpy())
    return explained_signal(np.concatenate(scores), noise.information(radius_px))


def search_classes(cfg: TrainConfig) -> int:
    """How many maps the search finds together: ``--classes`` with ``--class-search``, else 1."""
    return cfg.classes if cfg.classes > 1 and cfg.class_search else 1


def signal_energy(particles: Particles, cfg: TrainConfig) -> float:
    """The images' whitened signal energy per image within the policy's band (NaN: unknown)."""
    noise = particles.dataset.noise
    return noise.information(cfg.policy.signal_band_px) if noise is not None else float("nan")


def plan_record(cfg: TrainConfig, n_particles: int, box_px: int, start: str) -> StageRecord:
    """The search's budget and schedule, and which of it follows the data (the ``search_plan``
    stage): the subset (past ``search_subset`` the search's cost does not grow with the data
    set), the start and so the band schedule (a blob's EM widens its band; a start from class
    averages or a given map runs at the final band from the start), and the first guesses'
    band. The EM's batch and iterations are fixed (docs/pipeline.md#search-start).
    """
    settings = search_settings(cfg, box_px)
    subset = min(settings.subset, n_particles)
    batch = min(settings.batch, subset)
    kind = {"blob": "a blob", "classes": "2D class averages", "map": "the given map"}[start]
    if search_classes(cfg) > 1:
        kind = f"{cfg.classes} blobs, {cfg.classes} classes searched together"
    band = (
        f"{settings.radius_start_px:g} -> {settings.radius_end_px:g} px"
        if start == "blob"
        else f"{settings.radius_end_px:g} px from the start"
    )
    first_px = settings.radius_end_px if cfg.assign_radius_px is None else cfg.assign_radius_px
    figures = {
        "stage": "search_plan",
        "particles": n_particles,
        "subset": subset,
        "subset_cap": settings.subset,
        "batch": batch,
        "iterations": settings.iterations,
        "start": kind,
        "band_start_px": settings.radius_end_px if start != "blob" else settings.radius_start_px,
        "band_end_px": settings.radius_end_px,
        "first_guess_band_px": float(first_px),
        "retries": cfg.search_retries,
        "classes": search_classes(cfg),
    }
    said = (
        f"search plan: {subset} of {n_particles} particles ("
        + (
            "all"
            if subset == n_particles
            else f"at most {settings.subset}: the search's cost does not grow with the data set"
        )
        + f"), from {kind}, EM band {band}, batches of {batch} images for at most "
        f"{settings.iterations} iterations (at most {settings.iterations * batch / subset:.0f} "
        f"visits per image), first guesses within {first_px:g} px, up to "
        f"{cfg.search_retries} more attempt(s) if the map explains too little"
    )
    return StageRecord("search_plan", figures, (said,))


def search_stage(
    particles: Particles,
    cfg: TrainConfig,
    *,
    minutes_before: float = 0.0,
    say: Callable[[str], None] = print,
    log: Callable[[dict], None] = lambda r: None,
    progress: Progress | None = None,
) -> tuple[SearchRecord, list[StageRecord]]:
    """The search on its subset: a map and the subset's poses
    (docs/pipeline.md#search-attempts-and-acceptance).

    Parameters
    ----------
    particles : the run's particles (if the search's map comes out negative, the record's
        ``particles`` read the images with the other sign: :func:`contrast_check`).
    cfg : the run's options and policy.
    minutes_before : the run's minutes so far (``--max-minutes`` bounds every attempt).
    say : progress lines as they happen.
    log : the run log, for each attempt's record as it ends.
    progress : ``progress(what, done, total)`` as the search goes (a progress bar), or None.

    Returns
    -------
    The stage's record, and the records that led to it (the start's choice, the plan).
    """
    policy = cfg.policy
    box = particles.box_px
    t_all = time.perf_counter()
    before: list[StageRecord] = []
    energy = signal_energy(particles, cfg)
    if cfg.initial_map:
        volume = read_initial_map(cfg.initial_map, box, particles.pixel_size_a)
        say(
            f"search: starting from {cfg.initial_map} low-passed to {cfg.initial_map_resolution_a:g} A, "
            "the EM at its final band from the start"
        )
        start_map = starting_map(
            torch.as_tensor(volume, dtype=torch.float32, device=particles.device),
            particles.pixel_size_a,
            cfg.initial_map_resolution_a,
        )
        start = "map"
    else:
        start_map = None
        start, said = decisions.choose_start(cfg.search_start, energy, policy)
        before.append(
            StageRecord(
                "search_start",
                {"stage": "search_start", "start": start, "signal_energy": energy},
                (said,) if said else (),
            )
        )
    if search_classes(cfg) > 1 and start != "blob":
        if start == "map":
            raise InputError(f"--initial-map with --classes {cfg.classes}: the classes are searched from "
                             "blobs (add --no-class-search to search one map from it, then classify)")
        say(f"search: the {cfg.classes} classes are searched together from blobs (a start from class "
            "averages makes one map)")
        start = "blob"
    plan = plan_record(cfg, len(particles.table), box, start)
    before.append(plan)
    for record in before:
        log(record.figures)
        for line in record.said:
            say(line)
    best, attempts, tried, classes_tried, warnings = None, [], [], [], []
    minutes = minutes_before
    contrast_flips = 0
    for attempt in range(cfg.search_retries + 1):
        deadline = None if cfg.max_minutes is None else time.perf_counter() + (cfg.max_minutes - minutes) * 60
        if deadline is not None and attempt > 0 and time.perf_counter() >= deadline:
            break
        settings = replace(search_settings(cfg, box), seed=cfg.seed + 1000 * attempt,
                           n_classes=search_classes(cfg))
        found = search_subset(
            particles.spectra(),
            settings,
            log=say,
            deadline=deadline,
            start=start_map if start == "map" else "classes" if start == "classes" else None,
            progress=progress,
        )
        found, inverted = contrast_check(particles, cfg, found, flipped=contrast_flips % 2 == 1)
        if inverted is not None:
            # the images read with the other sign from here on
            particles = replace(particles, dataset=particles.dataset.variant(sign=-particles.dataset.sign))
            contrast_flips += 1
            warnings.append(inverted)
        # The subset posed afresh against the search's final map (pose_search.repose_subset), by the
        # exhaustive global search: these poses teach and check the encoder.
        t0 = time.perf_counter()
        exhaustive = replace(assignment_settings(cfg, box), prune_keep=0)
        found = repose_subset(found, PoseAssigner(particles.formation, found.fourier_volume, exhaustive)) \
            if found.classes is None else repose_classes(found, particles.formation, exhaustive)
        repose_seconds = time.perf_counter() - t0
        minutes += (found.seconds + repose_seconds) / 60
        explained = explained_share(particles, found, settings.radius_end_px)
        # With --sym the views are judged after the symmetry stage: a symmetric molecule's C1 poses
        # may gather in one asymmetric unit, which looks like preferred views (NaN: not judged).
        scf = float("nan") if wants_symmetry(cfg) else \
            sampling_compensation_factor(found.rotations.double().cpu().numpy())
        attempts.append(AttemptFigures(attempt + 1, start, explained, scf))
        log(
            {
                "stage": "search",
                "attempt": attempt + 1,
                "seed": settings.seed,
                "start": start,
                "minutes": minutes,
                "search_seconds": found.seconds + repose_seconds,
                "repose_seconds": repose_seconds,
                "subset": len(found.subset),
                "explained_signal": explained,
                "views_scf": scf,
                "time_limit_reached": found.time_limit_reached,
                "em_band_px": list(found.em_band_px),  # per EM iteration: the convergence
                "em_posterior": list(found.em_posterior),
            }
        )
        tried.append((found.subset, found.rotations.detach().double().cpu(), explained))
        if found.class_averages is not None:
            classes_tried.append(explained)
        verdict = decisions.judge_attempt(
            attempts[-1],
            None if best is None else best[1],
            cfg.search_retries - attempt,
            cfg.search_start == "auto",
            policy,
        )
        if verdict.keep:
            best = (found, explained, attempt + 1)
        if verdict.said:
            say(verdict.said)
        if not verdict.again:
            break
        start = verdict.next_start if found.classes is None else "blob"  # K classes: from blobs only
    found, explained, kept_attempt = best
    said = []
    if found.class_averages is None and classes_tried:
        said.append(
            f"search: the searches from class averages explain at most {max(classes_tried):.0%} of the "
            f"signal (doubtful below {policy.doubtful_explained_from_classes:.0%}): the blob's, which "
            f"explains {explained:.0%}, is kept"
        )
    kept_start = "map" if cfg.initial_map else "classes" if found.class_averages is not None else "blob"
    warnings += decisions.search_warnings(
        particles.source, len(attempts), explained, energy, kept_start, policy
    )
    agreement = None
    if decisions.is_doubtful(explained, found.class_averages is not None, policy):
        agreement = attempts_agreement(found, tried, cfg.seed)
        warnings.append(
            decisions.doubtful_warning(particles.source, len(tried), explained, agreement, policy)
        )
    figures = {
        "stage": "search_done",
        "attempts": len(attempts),
        "kept_attempt": kept_attempt,
        "explained_signal": explained,
        "attempts_agreement": agreement,
        "seconds": time.perf_counter() - t_all,
        "minutes": minutes,
        "contrast_flips": contrast_flips,
    }
    return SearchRecord(
        "search_done",
        figures,
        tuple(said),
        tuple(warnings),
        found=found,
        attempts=tuple(attempts),
        kept_attempt=kept_attempt,
        explained=explained,
        contrast_inverted=contrast_flips % 2 == 1,
        particles=particles,
    ), before


def attempts_agreement(found: SubsetSearch, tried: list, seed: int) -> float | None:
    """How far the other attempts' poses agree with the kept one's: the largest share of the
    particles both searched that they place alike (:func:`cryoai.evaluation.metrics.pose_agreement`);
    None with one attempt.
    """
    agreement = None
    rot = found.rotations.detach().double().cpu()
    for subset, rotations, _ in tried:
        if subset is found.subset or (rotations.shape == rot.shape and torch.equal(rotations, rot)):
            continue  # the kept attempt's own
        common, mine, theirs = np.intersect1d(found.subset, subset, return_indices=True)
        if len(common) < 10:
            continue
        share = pose_agreement(rot[mine].numpy(), rotations[theirs].numpy(), seed=seed)
        agreement = share if agreement is None else max(agreement, share)
    return agreement


def contrast_check(
    particles: Particles, cfg: TrainConfig, found: SubsetSearch, *, flipped: bool
) -> tuple[SubsetSearch, str | None]:
    """Data of the other contrast sign (protein dark) make the search's map negative: the run
    goes on with the images inverted (docs/pipeline.md#contrast). The search's poses stay right
    (the error of the negated images against the negated map is the same), so only the signs
    change: the map's, the subset's spectra's and the data set's (the caller reads the images
    with the other sign from then on, and the run writes ``invert_contrast`` flipped into
    config.yaml and the checkpoint, so that predict-poses reads the data the same way).

    Returns
    -------
    The search (negated where it was negative) and the warning (None: the map is positive).
    """
    skewness = density_skewness(ifft3_c(found.fourier_volume).real, mask_radius_px(cfg, particles.box_px))
    if not decisions.is_inverted(skewness, cfg.policy):
        return found, None
    inverted_now = not (cfg.invert_contrast != flipped)  # the option as the run goes on from here
    flag = "with" if inverted_now else "without"
    warning = (
        f"{particles.source}: the images' contrast looks inverted (protein dark: the search's map has "
        f"density skewness {skewness:.2f}); the run goes on as {flag} --invert-contrast"
    )
    return replace(found, fourier_volume=-found.fourier_volume, spectra=-found.spectra), warning


def balance_views_stage(particles: Particles, cfg: TrainConfig, found: SubsetSearch, *,
                        say: Callable[[str], None] = print, progress: Progress | None = None) -> ViewsRecord:
    """Where the subset's views are preferred, its poses refined against half maps that weigh
    every direction of views alike (:func:`cryoai.reconstruction.view_balance.refine_balanced`),
    and the balanced map is the one the other particles are posed against
    (docs/pipeline.md#view-balancing). Unchanged otherwise, or with ``--no-balance-views``.
    """
    policy = cfg.policy
    if wants_symmetry(cfg):  # (judged once the group's frame is known: see search_stage)
        return ViewsRecord("balanced_views", found=found, balanced=False)
    scf = sampling_compensation_factor(found.rotations.double().cpu().numpy())
    if not decisions.should_balance_views(cfg.balance_views, scf, len(found.spectra), policy):
        return ViewsRecord("balanced_views", found=found, balanced=False)
    say(
        f"views: the subset's views are preferred (SCF* {scf:.2f} < {policy.preferred_views_scf}): "
        "refining its poses against maps that weigh every view alike"
    )
    out = refine_balanced(
        particles.formation,
        found.spectra,
        found.ctf,
        found.rotations,
        found.shifts_px,
        assignment_settings(cfg, particles.box_px),
        mask_radius_px=mask_radius_px(cfg, particles.box_px),
        seed=cfg.seed,
        log=say,
        progress=progress,
    )
    scf_after = sampling_compensation_factor(out.rotations.double().cpu().numpy())
    figures = {
        "stage": "balanced_views",
        "views_scf": scf,
        "views_scf_after": scf_after,
        "rounds": len(out.median_change_deg),
        "median_change_deg": out.median_change_deg,
        "effective_particles": out.effective_particles,
        "seconds": out.seconds,
    }
    said = (
        f"views: {len(out.median_change_deg)} balanced rounds in {out.seconds:.0f} s (the weights are worth "
        f"{out.effective_particles:.0f} of {len(out.weights)} particles); SCF* now {scf_after:.2f}"
    )
    balanced = replace(
        found,
        rotations=out.rotations.to(found.rotations.dtype),
        shifts_px=out.shifts_px.to(found.shifts_px.dtype),
        fourier_volume=out.reconstruction.fourier_volume,
    )
    return ViewsRecord("balanced_views", figures, (said,), found=balanced, balanced=True)
