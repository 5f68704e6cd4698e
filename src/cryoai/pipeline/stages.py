"""The default run's other stages: noise model, pose encoder, assignment, reconstruction and
junk, 3D classes, and the views check. Each takes the run's particles, options and the records
it needs, and returns its own record (docs/pipeline.md, one section each).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..data.cropped import cropped_dataset
from ..data.noise import measure_noise
from ..models.encoder import PoseGridEncoder
from ..models.image_formation import ImageFormation
from ..physics.fft import ifft3_c
from ..physics.fsc import resolution_px
from ..physics.grids import max_paired_radius_px
from ..physics.poses import Poses
from ..physics.projection import gridding_corrected
from ..reconstruction import PoseAssigner, assign_remaining
from ..reconstruction.classes3d import Classes3DSettings, ClassRefinementSettings, classify_3d, refine_classes
from ..reconstruction.junk_sorting import score_band_px, sort_junk
from ..reconstruction.latent import LatentSettings, fit_latent
from ..reconstruction.particle_scores import micrograph_amplitude, score_particles
from ..reconstruction.pose_search import Progress, SubsetSearch
from ..reconstruction.regularised import Reconstruction, density_skewness, reconstruct
from ..reconstruction.shard import ALONE, Shard
from ..simulate.views import sampling_compensation_factor
from ..training.config import TrainConfig
from ..training.encoder_fit import (
    EncoderSettings,
    check_pose_encoder,
    first_guess_seconds,
    train_pose_encoder,
)
from . import decisions
from .records import (
    ClassesRecord,
    EncoderRecord,
    JunkRecord,
    LatentRecord,
    MapRecord,
    NoiseRecord,
    Particles,
    PosesRecord,
    StageRecord,
    WorkingBoxRecord,
)
from .settings import assignment_settings, junk_settings, mask_radius_px


def noise_stage(particles: Particles, cfg: TrainConfig) -> NoiseRecord:
    """The noise spectrum measured on the images' background (``--noise-model``;
    docs/pipeline.md#noise-model): the record holds the model the run whitens the images by
    from here on (None: white noise, or images that hold no measurable noise: ``noise_free``).
    """
    t0 = time.perf_counter()
    noise = measure_noise(
        particles.dataset, cfg.noise_model, mask_radius_px(cfg, particles.box_px), seed=cfg.seed
    )
    noise_free = noise is None and cfg.noise_model != "white"
    if noise is None:
        said = (
            ("noise: the images' background holds no measurable noise: not whitened",) if noise_free else ()
        )
        return NoiseRecord("noise", {}, said, noise=None, noise_free=noise_free)
    s = {**noise.summary(), "noise_seconds": round(time.perf_counter() - t0, 2)}
    said = (
        f"noise: spectra of {s['noise_groups']} group(s) measured on the background of "
        f"{s['noise_images_measured']} images ({noise.kind}); low/high-frequency power "
        f"{s['noise_low_over_high_power']:.2f} (1 = white), levels spread {s['noise_level_spread']:.2f}x; "
        "the images are whitened by them"
    )
    return NoiseRecord("noise", {"stage": "noise", **s}, (said,), noise=noise)


def working_box_stage(particles: Particles, cfg: TrainConfig) -> WorkingBoxRecord | None:
    """The box the search, its first guesses, the pose encoder and the assignment work at
    (:func:`cryoai.pipeline.decisions.working_box`; docs/pipeline.md#working-box): the run's
    particles Fourier-cropped to it as they are read, with their own intensity scale and noise
    model measured at that box. None: the full box (64 px or less by default).
    """
    box_px = particles.box_px
    bands = (cfg.search_radius_end, cfg.search_radius_start, cfg.assign_radius_px or 0.0)
    work_px = decisions.working_box(box_px, bands, cfg.policy)
    if work_px is None:
        return None
    t0 = time.perf_counter()
    dataset = cropped_dataset(particles.dataset, work_px, n_samples=cfg.normalize_samples, seed=cfg.seed)
    formation = ImageFormation(work_px, dataset.table.median_pixel_size_a()).to(particles.device)
    work = Particles(dataset.table, dataset, formation, particles.device)
    noise = noise_stage(work, cfg)
    work = replace(work, dataset=dataset.variant(noise=noise.noise))
    pixel_a = work.pixel_size_a
    figures = {"stage": "working_box", "box_px": work_px, "full_box_px": box_px, "pixel_size_a": pixel_a,
               "scale": dataset.scale, "seconds": round(time.perf_counter() - t0, 2)}
    said = (f"working box: the search, its first guesses, the pose encoder and the assignment on the "
            f"images Fourier-cropped to {work_px} px ({pixel_a:.3g} A per px, Nyquist {2 * pixel_a:.3g} A); "
            f"the reconstruction, the junk calls and the polish at the full {box_px} px",)
    return WorkingBoxRecord("working_box", figures, said, particles=work)


def first_guess_stage(particles: Particles, cfg: TrainConfig) -> tuple[TrainConfig, StageRecord | None]:
    """The global first guesses' band from the images' measured signal
    (:func:`cryoai.pipeline.decisions.first_guess_band`; docs/pipeline.md#first-guess-band),
    kept in the run's options (config.yaml, the checkpoint: so predict-poses poses new particles
    in the same band). Returns the options with the band, and the record (None: nothing chosen).
    """
    band_px, figures = decisions.first_guess_band(
        cfg.assign_radius_px,
        cfg.search_radius_end,
        cfg.assign_refine_radius_frac,
        particles.box_px,
        particles.dataset.noise,
        cfg.policy,
    )
    if figures is None:
        return cfg, None
    said = decisions.first_guess_said(band_px, figures, cfg.policy)
    if band_px is not None:
        cfg = replace(cfg, assign_radius_px=band_px)
    return cfg, StageRecord("assignment_band", figures, (said,) if said else ())


def encoder_stage(
    particles: Particles,
    cfg: TrainConfig,
    fourier_volume: torch.Tensor,
    spectra: torch.Tensor,
    ctf: torch.Tensor,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    *,
    minutes_before: float,
    particles_to_pose: int,
    trains: bool = True,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> EncoderRecord:
    """The pose encoder learns from a map and the poses of some particles (all but a held-out
    part), then is checked against those poses on the held-out part; the policy decides
    whether it poses the other particles (docs/pipeline.md#pose-encoder).

    ``particles_to_pose``: how many particles of this run it may pose (those outside the
    search's subset; under ``--pose-encoder auto`` none means no encoder:
    :func:`cryoai.pipeline.decisions.encoder_wanted`). ``trains``: this process trains it (under
    torchrun rank 0 does, and the poses are broadcast).
    """
    policy = cfg.policy
    minutes = cfg.encoder_minutes
    wanted, why = decisions.encoder_wanted(cfg.pose_encoder, particles_to_pose)
    if not wanted:
        return EncoderRecord("encoder", said=(why,) if why else ())
    said = []
    if cfg.max_minutes is not None:
        minutes = min(minutes, cfg.max_minutes - minutes_before)
        if minutes <= 0 and cfg.pose_encoder != "off":
            said.append("encoder: time limit (--max-minutes) reached: no pose encoder is trained")
    if cfg.pose_encoder == "off" or minutes <= 0 or len(spectra) < policy.min_subset_particles or not trains:
        return EncoderRecord("encoder", said=tuple(said))
    t0 = time.perf_counter()
    settings = EncoderSettings(minutes=minutes, seed=cfg.seed)
    band_px = cfg.refine_radius_frac * max_paired_radius_px(particles.box_px)  # the search map's band
    if cfg.pose_encoder == "auto":
        # Its cost model, before it is trained: the two first guesses timed on a probe of the subset.
        torch.manual_seed(cfg.seed + 5)
        probe = torch.arange(min(len(spectra), 256), device=spectra.device)
        global_s, amortized_s = first_guess_seconds(
            PoseGridEncoder(band_px=band_px).to(particles.device),
            particles.formation,
            fourier_volume,
            spectra[probe],
            ctf[probe],
            assignment_settings(cfg, particles.box_px),
        )
        pays, why = decisions.encoder_may_pay(particles_to_pose, global_s, amortized_s, 60 * minutes)
        if not pays:
            figures = {"stage": "encoder", "seconds": time.perf_counter() - t0, "trained": False,
                       "global_first_guess_images_per_s": 1 / global_s,
                       "amortized_first_guess_images_per_s": 1 / amortized_s}
            return EncoderRecord("encoder", figures, (*said, why))
    n = len(spectra)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 99)).to(spectra.device)
    n_check = min(settings.held_out, max(n // 10, 1))
    check_rows, train_rows = order[:n_check], order[n_check:]
    torch.manual_seed(cfg.seed + 5)  # the encoder's initial weights
    encoder = PoseGridEncoder(band_px=band_px).to(particles.device)
    say(
        f"encoder: learning poses from the map for at most {minutes:.3g} min "
        f"({len(train_rows)} real particles with their poses, simulated ones)"
    )
    fit = train_pose_encoder(
        encoder,
        particles.formation,
        fourier_volume,
        spectra[train_rows],
        ctf[train_rows],
        rotations[train_rows],
        shifts_px[train_rows],
        settings,
        log=say,
        progress=progress,
    )
    check = check_pose_encoder(
        encoder,
        particles.formation,
        fourier_volume,
        spectra[check_rows],
        ctf[check_rows],
        rotations[check_rows],
        assignment_settings(cfg, particles.box_px),
        settings,
    )
    passed, why = decisions.encoder_pays(check.to_dict(), policy)
    use = cfg.pose_encoder == "always" or passed
    figures_check = {**check.to_dict(), "passed": passed, "used": use}
    said.append(
        f"encoder check on {check.particles} held-out particles: {cfg.encoder_hypotheses} hypotheses hold a "
        f"rotation within {settings.agreement_deg:g} deg of the search's pose for "
        f"{check.hypothesis_hit_rate:.0%}; posed within it: {check.amortized_agreement:.0%} amortized "
        f"({check.amortized_images_per_s:.0f} img/s), {check.global_agreement:.0%} by the global search "
        f"({check.global_images_per_s:.0f} img/s); with the global search for the "
        f"{1 - check.amortized_fraction:.0%} the encoder is least sure of: {check.combined_agreement:.0%} "
        f"({check.combined_images_per_s:.0f} img/s)"
    )
    if not use:
        said.append(
            f"encoder: not used ({why}): the other particles get the global search; it is saved, and "
            "predict-poses --first-guess encoder uses it"
        )
    seconds = time.perf_counter() - t0
    figures = {
        "stage": "encoder",
        "seconds": seconds,
        **fit,
        **{f"check_{k}": v for k, v in figures_check.items()},
    }
    return EncoderRecord("encoder", figures, tuple(said), encoder=encoder, check=figures_check, used=use)


def assignment_stage(
    particles: Particles,
    cfg: TrainConfig,
    found: SubsetSearch,
    encoder: EncoderRecord,
    *,
    symmetry: torch.Tensor | None = None,
    shard: Shard = ALONE,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> PosesRecord:
    """Every particle outside the search's subset posed against its map (the encoder's
    hypotheses when it is used, else the global search, over one asymmetric unit where the map
    has a point group ``symmetry``; then local refinement), then the map centred; returns the
    poses of every particle (docs/pipeline.md#assignment). ``shard``: under torchrun, each rank
    poses its block of the particles and every rank gets every pose.
    """
    t0 = time.perf_counter()
    assigner = PoseAssigner(
        particles.formation,
        found.fourier_volume,
        assignment_settings(cfg, particles.box_px),
        encoder.encoder if encoder.used else None,
        min_confidence=decisions.encoder_min_confidence(encoder.check, cfg.pose_encoder),
        symmetry=symmetry,
    )
    n_rest = len(particles.table) - len(found.subset)
    poses = assign_remaining(particles.spectra(), found, assigner, log=say, progress=progress, shard=shard)
    seconds = time.perf_counter() - t0
    figures = {
        "stage": "assignment",
        "mode": assigner.mode,
        "particles": n_rest,
        "amortized": assigner.counts["amortized"],
        "global": assigner.counts["global"],
        "seconds": seconds,
        "images_per_s": n_rest / seconds if n_rest and seconds > 0 else None,
    }
    return PosesRecord("assignment", figures, poses=poses)


def junk_stage(
    particles: Particles,
    cfg: TrainConfig,
    poses: Poses,
    rec: Reconstruction,
    sums,
    symmetry: torch.Tensor | None = None,
    shard: Shard = ALONE,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> JunkRecord:
    """Every particle scored against the map at its pose, the junk called, and the particles
    called junk posed again against the kept particles' map
    (:mod:`cryoai.reconstruction.junk_sorting`; docs/pipeline.md#junk). The record holds the
    kept particles' reconstruction and the poses (those of the particles posed better changed).
    """
    sorting = sort_junk(
        particles.spectra(),
        poses,
        rec,
        groups=particles.table.micrograph_ids,
        assign_settings=assignment_settings(cfg, particles.box_px),
        mask_radius_px=mask_radius_px(cfg, particles.box_px),
        settings=junk_settings(cfg),
        seed=cfg.seed,
        sums=sums,
        symmetry=symmetry,
        shard=shard,
        log=say,
        progress=progress,
    )
    decision = sorting.decision
    n_junk = int((~decision.keep).sum())
    said = (
        f"junk: {n_junk} of {len(particles.table)} particles ({decision.junk_fraction:.0%}) lie farther than "
        f"{decision.threshold:g} sd from the particles' cluster (amplitude, unexplained power; band "
        f"{sorting.radius_px:.1f} px); {sorting.reposed} took a better pose on a second look; the map is "
        f"made from the other {int(decision.keep.sum())}"
    )
    figures = {
        "stage": "junk",
        "junk": n_junk,
        "kept": int(decision.keep.sum()),
        "junk_fraction": decision.junk_fraction,
        "band_px": sorting.radius_px,
        "reposed": sorting.reposed,
        "passes": cfg.junk_passes,
        "score_median_kept": float(np.median(sorting.scores.score[decision.keep])),
        "seconds": sorting.seconds,
    }
    return JunkRecord(
        "junk",
        figures,
        (said,),
        poses=sorting.poses,
        kept=decision.keep,
        scores=sorting.scores,
        distance=decision.distance,
        reconstruction=sorting.reconstruction,
    )


def reconstruction_figures(
    particles: Particles, cfg: TrainConfig, rec: Reconstruction, *, seconds: float, fit_error: float | None
) -> StageRecord:
    """The reconstruction's record: its half-map resolution, and a warning if the map is
    negative (the images' contrast inverted: docs/pipeline.md#contrast).
    """
    res = resolution_px(rec.fsc_halves, 0.143)
    res_05 = resolution_px(rec.fsc_halves, 0.5)
    skewness = density_skewness(ifft3_c(rec.fourier_volume).real, mask_radius_px(cfg, particles.box_px))
    inverted = decisions.is_inverted(skewness, cfg.policy)
    warnings = ()
    if inverted:
        # Never hand over a negative map without saying so (here and in outputs.json).
        flag = "without" if cfg.invert_contrast else "with"
        warnings = (
            f"the reconstructed map is mostly negative (density skewness {skewness:.2f}): the images' "
            f"contrast looks inverted (protein dark); run again {flag} --invert-contrast",
        )
    figures = {
        "stage": "reconstruction",
        "half_map_fsc_0.143_px": res,
        "half_map_fsc_0.143_a": res * particles.pixel_size_a,
        "half_map_fsc_0.5_px": res_05,
        "half_map_fsc_0.5_a": res_05 * particles.pixel_size_a,
        "decoder_fit_relative_error": fit_error,
        "map_density_skewness": skewness,
        "contrast_inverted": inverted,
        "seconds": seconds,
    }
    return StageRecord("reconstruction", figures, warnings=warnings)


def classes_stage(
    particles: Particles,
    cfg: TrainConfig,
    poses: Poses,
    rec: Reconstruction,
    junk: JunkRecord | None,
    symmetry: torch.Tensor | None = None,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
    searched: tuple[np.ndarray, np.ndarray, Poses] | None = None,
) -> ClassesRecord:
    """``--classes K``: K maps and each particle's class at the run's poses
    (:mod:`cryoai.reconstruction.classes3d`; docs/pipeline.md#3d-classes), junk included, so that
    it gathers in classes of its own; with ``--class-poses``, then posed again against every
    class's map and classified at its own pose per class (several structures). The record holds
    the classes' maps, largest first, and the particles' poses in their classes' maps.

    ``searched``: the K classes the search found together (``--class-search``): the subset's rows,
    their classes, and poses of every particle (the subset's in their classes' maps, shifts in
    Angstrom; the others' unused). Each class's
    first map is then its subset images' reconstruction at the full box, and every particle is
    posed against every class from there (heterogeneous refinement), not classified at the
    run's one pose first.
    """
    n = len(particles.table)
    box = particles.box_px
    band_px = score_band_px(rec)
    scores = (
        junk.scores
        if junk is not None
        else score_particles(particles.spectra(), rec.fourier_volume, poses, band_px)
    )
    trusted = junk.kept if junk is not None else np.ones(n, bool)
    amplitude = micrograph_amplitude(scores.amplitude, particles.table.micrograph_ids, trusted)
    def poses_per_class(starts: list[torch.Tensor]):
        """Every particle posed against every class from these start maps (heterogeneous refinement)."""
        return refine_classes(
            particles.spectra(),
            np.arange(n),
            starts,
            assign=assignment_settings(cfg, box),
            amplitude=amplitude,
            radius_px=band_px,
            mask_radius_px=mask_radius_px(cfg, box),
            settings=ClassRefinementSettings(seed=cfg.seed),
            symmetry=symmetry,
            log=say,
            progress=progress,
        )

    if searched is not None:
        rows, found_classes, found_poses = searched
        starts = [
            reconstruct(particles.spectra(), found_poses, mask_radius_px=mask_radius_px(cfg, box),
                        seed=cfg.seed, indices=rows[found_classes == k], symmetry=symmetry).fourier_volume
            for k in range(cfg.classes)
        ]
        result, class_poses = poses_per_class(starts)
        return _classes_record(particles, result, class_poses, trusted)
    result = classify_3d(
        particles.spectra(),
        poses,
        np.arange(n),
        amplitude=amplitude,
        radius_px=band_px,
        mask_radius_px=mask_radius_px(cfg, box),
        settings=Classes3DSettings(n_classes=cfg.classes, seed=cfg.seed),
        symmetry=symmetry,
        log=say,
    )
    class_poses = None
    if cfg.class_poses:
        seconds = result.seconds
        result, class_poses = poses_per_class([r.fourier_volume for r in result.reconstructions])
        result.seconds += seconds
    return _classes_record(particles, result, class_poses, trusted)


def _classes_record(particles: Particles, result, class_poses: Poses | None,
                    trusted: np.ndarray) -> ClassesRecord:
    """The classes stage's record: the classes largest first, their maps, sizes and resolutions."""
    box = particles.box_px
    order = np.argsort(-result.sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    classes = rank[result.assignment]
    info, maps = [], []
    for i, k in enumerate(order):
        members = classes == i
        res_px = float(result.resolution_px[k])
        name = f"class_{i + 1:03d}"
        info.append(
            {
                "class": i + 1,
                "particles": int(members.sum()),
                "junk_called": int((~trusted)[members].sum()),
                "resolution_px": res_px,
                "resolution_a": res_px * particles.pixel_size_a,
                "map": f"{name}.mrc",
            }
        )
        k_rec = result.reconstructions[k]
        half = (
            tuple((gridding_corrected(h) * box).cpu().numpy().astype(np.float32) for h in k_rec.half_maps)
            if k_rec.half_maps is not None
            else None
        )
        maps.append(
            MapRecord(
                name,
                (gridding_corrected(ifft3_c(k_rec.fourier_volume).real) * box).cpu().numpy(),
                half,
                np.flatnonzero(members),
                res_px,
                file=f"{name}.mrc",
            )
        )
    said = "3D classes: " + "; ".join(
        f"{c['class']}: {c['particles']} particles ({c['junk_called']} called junk), "
        f"{c['resolution_a']:.1f} A"
        for c in info
    )
    figures = {
        "stage": "classes",
        "classes": info,
        "iterations": result.iterations,
        "seconds": result.seconds,
    }
    return ClassesRecord(
        "classes",
        figures,
        (said,),
        classes=classes,
        probability=result.probability,
        info=tuple(info),
        maps=tuple(maps),
        poses=class_poses,
    )


def views_stage(
    particles: Particles,
    cfg: TrainConfig,
    poses: Poses,
    kept: np.ndarray | None,
    *,
    searched: bool,
    balanced: bool,
    symmetry: torch.Tensor | None = None,
) -> StageRecord:
    """The SCF* of the kept particles' views (Baldwin & Lyumkis 2020), and a warning where they
    are preferred: directions of Fourier space the views leave undersampled, so the map is
    smeared along them (docs/pipeline.md#view-balancing). With a point group ``symmetry``, each
    pose counts with its equivalents ``S R`` (the map is sampled at all of them).
    """
    rows = np.arange(len(particles.table)) if kept is None else np.flatnonzero(kept)
    rotations = poses.rotations[rows].double()
    if symmetry is not None and len(symmetry) > 1:
        rotations = torch.einsum("kab,nbc->nkac", symmetry.double(), rotations).reshape(-1, 3, 3)
    scf = sampling_compensation_factor(rotations.numpy())
    warning = decisions.views_warning(particles.source, scf, searched, balanced, cfg.policy)
    return StageRecord(
        "views",
        {"stage": "views", "views_scf": scf, "particles": len(rows)},
        warnings=(warning,) if warning else (),
    )


def latent_stage(
    particles: Particles,
    cfg: TrainConfig,
    poses: Poses,
    rec: Reconstruction,
    junk: JunkRecord | None,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
    minutes_before: float = 0.0,
) -> LatentRecord:
    """``--latent-dim D``: the continuous latent model at the run's poses
    (:mod:`cryoai.reconstruction.latent`; docs/pipeline.md#continuous-heterogeneity): fitted to
    the particles not called junk, from the consensus map, within the consensus map's resolution
    (or ``--latent-resolution-a``); every particle then gets its latent vector, junk included.
    """
    n, box = len(particles.table), particles.box_px
    pixel_size_a = particles.pixel_size_a
    if cfg.latent_resolution_a is not None:
        band_px = box * pixel_size_a / cfg.latent_resolution_a
    else:
        band_px = box / resolution_px(rec.fsc_halves, 0.143)
    band_px = float(min(band_px, max_paired_radius_px(box)))
    rows = np.arange(n) if junk is None else np.flatnonzero(junk.kept)
    settings = LatentSettings(dim=cfg.latent_dim, band_px=band_px, iterations=cfg.policy.latent_iterations,
                              ridge=cfg.policy.latent_ridge, seed=cfg.seed)
    say(f"latent model: {cfg.latent_dim} dimensions to {box * pixel_size_a / band_px:.1f} A, fitted to "
        f"{len(rows):,} particles at their poses ({settings.iterations} passes)")
    deadline = (None if cfg.max_minutes is None
                else time.perf_counter() + max(0.0, cfg.max_minutes - minutes_before) * 60)
    model = fit_latent(particles.spectra(), poses, rows, rec.fourier_volume, settings, all_rows=np.arange(n),
                       progress=None if progress is None else (lambda d, t: progress("latent model", d, t)),
                       deadline=deadline)
    if len(model.history) < settings.iterations:
        say(f"latent model: stopped after {len(model.history)} of {settings.iterations} passes "
            "(--max-minutes)")
    spread = ", ".join(f"{v:.2f}" for v in model.variance)
    supported = int((model.variance >= cfg.policy.latent_min_determined).sum())
    said = (f"latent model: fitted in {model.seconds:.0f} s; share of each dimension's spread that the "
            f"images determine: {spread} ({supported} of {cfg.latent_dim} above "
            f"{cfg.policy.latent_min_determined:g})",)
    warnings = ()
    if supported == 0:
        warnings = ("latent model: the images determine no dimension's spread beyond "
                    f"{cfg.policy.latent_min_determined:g}: these particles show no continuous change the "
                    "data support at this resolution",)
    figures = {
        "stage": "latent",
        "dim": cfg.latent_dim,
        "band_px": band_px,
        "resolution_a": box * pixel_size_a / band_px,
        "particles_fitted": int(len(rows)),
        "iterations": len(model.history),
        "determined": [float(v) for v in model.variance],
        "supported_dims": supported,
        "noise_var": model.noise_var,
        "residual_history": [float(h) for h in model.history],
        "seconds": model.seconds,
    }
    return LatentRecord("latent", figures, said, warnings, model=model, background=rec.fourier_volume)
