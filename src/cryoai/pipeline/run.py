"""The default run, top to bottom: what ``cryoai train`` runs and what a notebook calls.

:func:`run_default` reads as its stages (docs/pipeline.md#overview):

1. **noise**: the noise spectra measured on the images' background; the data whitened by them;
   the global first guesses' band chosen from the signal they leave;
2. **search** (default mode): a map and the poses of a subset, from a blob, 2D class averages
   or a given map, searched again while the policy finds the map wrong or doubtful; the subset's
   poses refined against **view-balanced** maps where its views are preferred;
3. **pose encoder** (where it may pay) and **assignment**: every other particle posed against
   the search's map;
4. **reconstruction**: the half-map FSC-regularised map at the poses; **junk** called and given
   a second look; **3D classes** (``--classes K``);
5. **polish**: the decoder fitted by mini-batch gradient descent (:class:`Trainer`), or, with
   ``--ab-initio encoder``, the paper's amortized training of encoder and decoder;
6. **outputs**: the map, half maps, poses (STAR and .cs), checkpoint, ``outputs.json``.

Each stage returns a record (:mod:`cryoai.pipeline.records`); this module words and logs them.
The mode is decided once, from the options: ``"given"`` (``--poses``), ``"search"`` (default)
or ``"amortized"`` (``--ab-initio encoder``). ``--resume`` restores the model, the optimiser, the
step and the stages' results from the checkpoint, and continues the fit.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.dataset import ParticleDataset, estimate_scale
from ..errors import InputError
from ..io import write_json_atomic
from ..io.images import ImageSource
from ..io.particles import ParticleTable
from ..models.encoder import PoseGridEncoder
from ..physics.grids import max_paired_radius_px
from ..physics.poses import Poses
from ..physics.projection import gridding_corrected
from ..physics.symmetry import point_group
from ..reconstruction.particle_scores import ParticleScores
from ..reconstruction.regularised import half_set_sums, half_sets, reconstruction_from_sums
from ..training.checkpoint import load_pose_encoder
from ..training.config import TrainConfig
from ..training.distributed import DistInfo, broadcast_, particle_shard
from ..training.run_dir import RUN_LOG, RunDirectory, strict_json
from ..training.trainer import (
    Trainer,
    TrainState,
    checkpoint_payload,
    new_model,
    new_optimizer,
    start_decoder,
)
from . import decisions
from .records import (
    ClassesRecord,
    EncoderRecord,
    JunkRecord,
    LatentRecord,
    MapRecord,
    Particles,
    RunResult,
    StageRecord,
)
from .search import balance_views_stage, read_initial_map, search_classes, search_stage
from .settings import at_full_box, in_pixels, mask_radius_px
from .stages import (
    assignment_stage,
    classes_stage,
    encoder_stage,
    first_guess_stage,
    junk_stage,
    latent_stage,
    noise_stage,
    reconstruction_figures,
    views_stage,
    working_box_stage,
)
from .symmetry import given_symmetry, symmetry_stage, wants_symmetry


def check_inputs(
    table: ParticleTable,
    cfg: TrainConfig,
    given_poses: ParticleTable | None = None,
    source: ImageSource | None = None,
) -> float:
    """Everything that can be checked before a run starts, so that a bad input fails before
    anything is written: the stacks (exist, MRC, mode, box, length), a sample of the images
    (NaN, infinite or blank images: the ``normalize_samples`` images of the intensity scale,
    and the first and last), the initial map and the given poses.

    Returns
    -------
    The global intensity scale of the images (:func:`estimate_scale`), to pass to
    :func:`run_default` so that the sample is read once.

    Raises
    ------
    InputError
        One line naming the file and the problem.
    """
    in_pixels(cfg, table.box_px, table.median_pixel_size_a(), str(table.source_path))  # (raises if it cannot)
    check_symmetry(cfg, given_poses is not None)
    source = source or ImageSource(table)
    source.validate()
    if cfg.initial_map:
        read_initial_map(cfg.initial_map, table.box_px, table.median_pixel_size_a())
    source.read(np.unique([0, len(table) - 1]))
    scale = estimate_scale(table, cfg.normalize_samples, cfg.seed, source=source)
    if given_poses is not None and (len(given_poses) != len(table) or not given_poses.has_poses):
        raise InputError(
            f"{given_poses.source_path}: --poses must hold poses for the same "
            f"{len(table)} particles (it has {len(given_poses)}"
            f"{'' if given_poses.has_poses else ', without poses'})"
        )
    return scale


def check_symmetry(cfg: TrainConfig, given_poses: bool) -> None:
    """``--sym``: a group RELION names, or ``auto`` where the run searches; refused with
    ``--ab-initio encoder`` (its decoder is not symmetrised).

    Raises
    ------
    InputError
        One line saying what ``--sym`` accepts.
    """
    asked = cfg.sym.strip().upper()
    if asked == "AUTO":
        if given_poses or cfg.ab_initio != "search":
            raise InputError("--sym auto: the groups are tested on the search's map (not with --poses or "
                             "--ab-initio encoder); give the group, e.g. --sym C4")
        return
    try:
        group = point_group(asked)
    except InputError as error:
        raise InputError(f"--sym: {error}") from None
    if len(group) > 1 and cfg.ab_initio != "search" and not given_poses:
        raise InputError(f"--sym {cfg.sym}: a point group is imposed by the default run's search and "
                         "reconstruction, not by --ab-initio encoder")


class _Run:
    """What the run says and keeps as it goes: its records and warnings, its progress bars, and
    ``run.log`` (every line it says, in the run directory).
    """

    def __init__(self, run_dir: RunDirectory, quiet: bool, is_main: bool):
        self.run_dir, self.quiet, self.is_main = run_dir, quiet or not is_main, is_main
        self.records: list[StageRecord] = []
        self.warnings: list[str] = []
        self.bar, self.bar_what = None, None

    def say(self, message: str) -> None:
        """A line for the terminal (unless quiet) and for ``run.log``."""
        self.run_dir.append_text(RUN_LOG, message)
        if not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def warn(self, message: str) -> None:
        """A warning: on stderr (rank 0), in ``run.log`` and in ``outputs.json``."""
        self.warnings.append(message)
        self.run_dir.append_text(RUN_LOG, f"warning: {message}")
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr)

    def progress(self, what: str, done: int, total: int) -> None:
        """A progress bar with its ETA, one per ``what`` (the previous one closed)."""
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if self.bar is None or self.bar_what != what or self.bar.total != total:
            self.close_bar()
            self.bar, self.bar_what = tqdm(total=total, desc=what, dynamic_ncols=True, leave=False), what
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close_bar()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_what = None, None

    def done(self, record: StageRecord | None, minutes: float | None = None) -> StageRecord | None:
        """A stage's record: logged (with the run's minutes so far), said, its warnings given."""
        self.close_bar()
        if record is None:
            return None
        self.records.append(record)
        if record.figures:
            self.run_dir.log(record.figures if minutes is None else {**record.figures, "minutes": minutes})
        for line in record.said:
            self.say(line)
        for warning in record.warnings:
            self.warn(warning)
        return record


def run_default(
    table: ParticleTable,
    cfg: TrainConfig | None = None,
    outdir: str | Path = "cryoai-run",
    *,
    device=None,
    fixed_poses: ParticleTable | None = None,
    resume: bool = False,
    quiet: bool = False,
    argv: list[str] | None = None,
    dist_info: DistInfo | None = None,
    scale: float | None = None,
    on_volume=None,
) -> RunResult:
    """The default run on a particle table (see the module docstring): ``cryoai train``.

    Parameters
    ----------
    table : the particles (:func:`cryoai.io.load_particles`).
    cfg : the options (default: :class:`TrainConfig`'s defaults).
    outdir : the run directory (created if absent).
    device : torch device (default: CUDA if present, else the CPU).
    fixed_poses : a table with poses to hold fixed (reconstruction with known poses).
    resume : continue the run in ``outdir`` from its checkpoint.
    quiet : no progress bar or log lines.
    argv : the command line, saved in checkpoints.
    dist_info : this process's rank under torchrun.
    scale : the images' intensity scale from :func:`check_inputs` (None: the inputs are checked here).
    on_volume : called with the :class:`Trainer` after each write of the map (e.g. an FSC).

    Returns
    -------
    :class:`RunResult`: the poses, the map, every stage's record, the outputs and warnings.
    """
    cfg = in_pixels(cfg or TrainConfig(), table.box_px, table.median_pixel_size_a(), str(table.source_path))
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dist = dist_info or DistInfo()
    mode = "given" if fixed_poses is not None else {"search": "search", "encoder": "amortized"}[cfg.ab_initio]
    if cfg.classes > 1 and mode != "search":
        raise InputError(
            f"--classes {cfg.classes}: the 3D classes are made at the poses the default run searches "
            "(not with --poses or --ab-initio encoder)"
        )
    if dist.is_main:
        Path(outdir).mkdir(parents=True, exist_ok=True)
    run_dir = RunDirectory(outdir, writes=dist.is_main, tensorboard=cfg.tensorboard, fresh=not resume)
    run = _Run(run_dir, quiet, dist.is_main)
    argv = argv or sys.argv
    # Model initialisation draws from the global generators.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    source = ImageSource(table)
    ckpt = run_dir.load_checkpoint(device) if resume else None
    if ckpt is not None:
        scale = float(ckpt["scale"])
    elif scale is None:
        scale = check_inputs(table, cfg, fixed_poses, source=source)
    dataset = ParticleDataset(table, invert_contrast=cfg.invert_contrast, scale=scale, source=source)
    particles = Particles(table, dataset, None, device)

    # 1. the noise model (the images whitened by it from here on), the box the search works at,
    # and the band the global first guesses score in
    noise = noise_stage(particles, cfg)
    dataset = dataset.variant(noise=noise.noise)
    particles = replace(particles, dataset=dataset)
    box = working_box_stage(particles, cfg) if mode == "search" else None
    work = None if box is None else box.particles  # the particles the search sees (None: these)
    cfg, band = first_guess_stage(work or particles, cfg)
    model = new_model(cfg, dataset, with_encoder=mode == "amortized", device=device)
    optimizer = new_optimizer(model, cfg)
    particles = replace(particles, formation=model.formation)
    work = work or particles
    working = None if box is None else {k: box.figures[k] for k in ("box_px", "scale")}
    state, saved = TrainState(), {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState.from_dict(ckpt["state"])
        run_dir.truncate_logs(state.step)
        saved = restored_stages(ckpt, device)
    run_dir.write_config(cfg)
    run.done(noise)
    run.done(box)
    run.done(band)

    poses = fixed_poses.poses() if fixed_poses is not None else saved.get("poses")
    encoder: EncoderRecord = saved.get("encoder", EncoderRecord("encoder"))
    junk: JunkRecord | None = saved.get("junk")
    latent: LatentRecord | None = None
    classes: ClassesRecord | None = saved.get("classes")
    views_balanced, explained = saved.get("views_balanced", False), float("nan")
    imposed = saved.get("symmetry", "C1")  # the point group imposed (after the search, if any)
    prior_lam, half_maps = saved.get("prior_lam"), None

    def checkpoint() -> None:
        if dist.is_main:
            extra = stage_payload(poses if mode == "search" else None, encoder, junk, classes, views_balanced,
                                  working, imposed)
            if prior_lam is not None:
                extra["prior_lam"] = prior_lam.cpu()
            run_dir.save_checkpoint(
                checkpoint_payload(model, optimizer, state, cfg, scale=scale, argv=argv, extra=extra)
            )

    # 2-3. the search, the view balancing, the pose encoder and the assignment
    searched_classes = None  # (subset, classes, poses) where the search found K classes together
    if mode == "search" and poses is None:
        search, before = search_stage(
            work, cfg, minutes_before=state.minutes, say=run.say, log=run_dir.log, progress=run.progress
        )
        for record in before:
            run.records.append(record)  # (logged and said as they happened)
        state.minutes = search.figures["minutes"]
        if search.contrast_inverted:
            # the images read with the other sign from here on, and so by predict-poses
            cfg = replace(cfg, invert_contrast=not cfg.invert_contrast)
            run_dir.write_config(cfg)
            if work is particles:
                particles = work = search.particles
                dataset = particles.dataset
            else:  # the full box's images too
                work = search.particles
                dataset = dataset.variant(sign=-dataset.sign)
                particles = replace(particles, dataset=dataset)
        run.done(search)
        explained = search.explained
        found = search.found
        if found.classes is not None:  # K classes searched together: the classes stage starts from them
            rotations = torch.eye(3).repeat(len(table), 1, 1)
            shifts_a = torch.zeros(len(table), 2)
            rotations[found.subset] = found.rotations.detach().float().cpu()
            shifts_a[found.subset] = found.shifts_px.detach().float().cpu() * work.pixel_size_a
            searched_classes = (found.subset, found.classes, Poses(rotations, shifts_a))
        if found.class_averages is not None:
            ca = found.class_averages
            run_dir.write_class_averages(
                ca.images.cpu().numpy() * work.box_px, ca.sizes.cpu().numpy(), work.pixel_size_a
            )
        views = balance_views_stage(work, cfg, found, say=run.say, progress=run.progress)
        found, views_balanced = views.found, views.balanced
        state.minutes += views.figures.get("seconds", 0.0) / 60
        run.done(views, state.minutes)
        if wants_symmetry(cfg):
            symmetry = symmetry_stage(work, cfg, found, say=run.say)
            found, imposed = symmetry.found, symmetry.imposed
            state.minutes += symmetry.figures.get("seconds", 0.0) / 60
            run.done(symmetry, state.minutes)
        encoder = encoder_stage(
            work,
            cfg,
            found.fourier_volume,
            found.spectra,
            found.ctf,
            found.rotations,
            found.shifts_px,
            minutes_before=state.minutes,
            particles_to_pose=len(table) - len(found.subset),
            trains=dist.is_main,
            say=run.say,
            progress=run.progress,
        )
        state.minutes += encoder.figures.get("seconds", 0.0) / 60
        run.done(encoder, state.minutes)
        if dist.enabled:  # every rank poses its block against rank 0's map, in rank 0's frame
            for tensor in (found.fourier_volume, found.rotations, found.shifts_px):
                broadcast_(torch.view_as_real(tensor) if tensor.is_complex() else tensor, dist)
        assignment = assignment_stage(work, cfg, found, encoder, say=run.say, progress=run.progress,
                                      symmetry=None if imposed == "C1" else point_group(imposed).float(),
                                      shard=particle_shard(dist))
        poses = assignment.poses
        state.minutes += assignment.figures["seconds"] / 60
        _broadcast_poses(poses, dist)
        run.done(assignment, state.minutes)
        del found, views, search
        checkpoint()

    if mode == "given" and wants_symmetry(cfg) and state.step == 0:
        imposed = run.done(given_symmetry(cfg)).imposed
    operators = None if imposed == "C1" else point_group(imposed).float()

    # 4. the reconstruction, the junk calls and the 3D classes
    if poses is not None and state.step == 0 and cfg.wiener_init:
        t0 = time.perf_counter()
        # The half sets' sums are kept for the junk stage, which updates them as poses change;
        # with a point group, every particle is inserted once per operator.
        sums = half_set_sums(particles.spectra(), poses, seed=cfg.seed, symmetry=operators,
                             progress=run.progress, shard=particle_shard(dist))
        rec = reconstruction_from_sums(sums, mask_radius_px=mask_radius_px(cfg, particles.box_px))
        if mode == "search" and cfg.sort_junk and search_classes(cfg) > 1:
            run.say(f"junk: not called against one map, as the search found {cfg.classes} structures: "
                    "junk goes to the classes (give one class more for it)")
        elif mode == "search" and cfg.sort_junk and dataset.noise is not None:
            # (the scores are in units of the measured noise: none without a noise model)
            full_cfg = at_full_box(cfg, None if working is None else working["box_px"], particles.box_px)
            junk = run.done(
                junk_stage(particles, full_cfg, poses, rec, sums, symmetry=operators,
                           shard=particle_shard(dist), say=run.say, progress=run.progress)
            )
            poses, rec = junk.poses, junk.reconstruction
            _broadcast_poses(poses, dist)
        del sums
        prior_lam, fit_error = start_decoder(model, rec.fourier_volume, rec.regulariser, cfg, log=run.say)
        seconds = time.perf_counter() - t0
        state.minutes += seconds / 60
        run.done(reconstruction_figures(particles, cfg, rec, seconds=seconds, fit_error=fit_error))
        half_maps = tuple((gridding_corrected(h) * particles.box_px).cpu().numpy().astype(np.float32)
                          for h in rec.half_maps)
        run_dir.write_half_maps(half_maps, particles.pixel_size_a)
        if mode == "given" and encoder.encoder is None:
            encoder = _encoder_from_given_poses(particles, cfg, poses, rec.fourier_volume, state, dist, run)
        if cfg.classes > 1:
            classes = run.done(
                classes_stage(particles, cfg, poses, rec, junk, symmetry=operators, say=run.say,
                              progress=run.progress, searched=searched_classes))
            run_dir.write_class_maps([m.volume for m in classes.maps], particles.pixel_size_a)
        if cfg.latent_dim > 0:
            latent = run.done(
                latent_stage(particles, cfg, poses, rec, junk, say=run.say, progress=run.progress,
                             minutes_before=state.minutes))
            state.minutes += latent.figures["seconds"] / 60
            run_dir.write_latent(latent.model, latent.background, particles.pixel_size_a)
        del rec
        checkpoint()

    # 5. the decoder's polish (or the paper's amortized training)
    trainer = Trainer(
        model,
        optimizer,
        dataset,
        cfg,
        run_dir,
        device=device,
        state=state,
        poses=poses,
        symmetry=operators,
        prior_lam=prior_lam,
        kept=None if junk is None else junk.kept,
        polish=mode == "search",
        noise_free=noise.noise_free,
        scale=scale,
        dist_info=dist,
        quiet=quiet,
        argv=argv,
        say=run.say,
        checkpoint_extra=stage_payload(
            poses if mode == "search" else None, encoder, junk, classes, views_balanced, working, imposed
        ),
    )
    run.records.append(StageRecord("fit", trainer.fit(on_volume)))  # (logged by the trainer)

    # 6. the outputs
    trainer.checkpoint()
    volume_path = trainer.write_volume()
    if on_volume is not None and dist.is_main:
        on_volume(trainer)
    run_dir.flush()
    outputs = {
        "volume": str(volume_path),
        "checkpoint": str(run_dir.checkpoint_path),
        "steps": state.step,
        "minutes": state.minutes,
        "images_seen": state.images_seen,
        "version": __version__,
    }
    sign = -1.0 if cfg.invert_contrast else 1.0  # cryoSPARC's blob/sign: -1 protein dark
    z = None if latent is None else latent.model.z
    if mode == "given" and z is not None:  # the given poses, written with each particle's latent vector
        outputs["poses"] = str(
            run_dir.write_poses(table, poses, sign=sign, image_paths=cfg.image_paths, latent=z))
        outputs["latent"] = str(run_dir.path / "latent.npz")
    if mode != "given":
        if poses is not None:
            # every particle's half set: the split of the half maps (and of the junk stage's)
            half_set = np.zeros(len(table), dtype=np.int64)
            half_set[half_sets(len(table), cfg.seed)[1]] = 1
            # with classes posed per class, each particle's pose is its class map's
            own = poses if classes is None or classes.poses is None else classes.poses
            written = run_dir.write_poses(table, own, particle_columns(junk, classes), half_set=half_set,
                                          sign=sign, image_paths=cfg.image_paths, latent=z)
            if z is not None:
                outputs["latent"] = str(run_dir.path / "latent.npz")
        elif dist.is_main:
            written = run_dir.write_poses(table, trainer.predicted_poses(), sign=sign,
                                          image_paths=cfg.image_paths)
        else:
            written = run_dir.poses_path
        outputs["poses"] = str(written)
    if poses is not None and mode == "search":
        views = run.done(
            views_stage(
                particles,
                cfg,
                poses,
                None if junk is None else junk.kept,
                searched=True,
                balanced=views_balanced,
                symmetry=operators,
            )
        )
        outputs["views_scf"] = views.figures["views_scf"]
        if math.isfinite(explained):
            outputs["search_explained_signal"] = explained
        if junk is not None:
            outputs["junk"] = int((~junk.kept).sum())
        if classes is not None:
            outputs["classes"] = list(classes.info)
    if run.warnings:
        outputs["warnings"] = list(run.warnings)
    outputs["symmetry"] = imposed
    outputs["world_size"] = dist.world_size
    if dist.is_main:
        write_json_atomic(run_dir.path / "outputs.json", strict_json(outputs))
    volume = trainer.volume()
    kept_rows = np.arange(len(table)) if junk is None else np.flatnonzero(junk.kept)
    reconstruction = next((r for r in reversed(run.records) if r.stage == "reconstruction"), None)
    own = MapRecord(
        "map",
        volume,
        half_maps,
        kept_rows,
        reconstruction.figures["half_map_fsc_0.143_px"] if reconstruction else float("nan"),
        symmetry=imposed,
        file=Path(volume_path).name,
    )
    result = RunResult(
        poses=poses,
        volume=volume,
        stages=run.records,
        outputs=outputs,
        warnings=list(run.warnings),
        kept=None if junk is None else junk.kept,
        classes=None if classes is None else classes.classes,
        maps=[own, *(classes.maps if classes is not None else ())],
    )
    for line in summary_lines(result, len(table), particles.box_px, particles.pixel_size_a):
        run.say(line)
    return result


#: The stages the summary times, in order, and their names there.
_TIMED = (
    ("noise", "noise"),
    ("search_done", "search"),
    ("balanced_views", "view balancing"),
    ("encoder", "encoder"),
    ("assignment", "assignment"),
    ("junk", "junk"),
    ("reconstruction", "reconstruction"),
    ("classes", "3D classes"),
    ("latent", "latent model"),
    ("fit", "polish"),
)


def summary_lines(result: RunResult, n_particles: int, box_px: int, pixel_size_a: float) -> list[str]:
    """The run's summary, as it ends: the map's resolution in Angstrom (and whether the box
    limits it), the particles used and called junk, the warnings, the time per stage, and where
    the outputs are.
    """
    out = result.outputs
    lines = ["summary:"]
    reconstruction = result.stage("reconstruction")
    if reconstruction is not None:
        f = reconstruction.figures
        res, res_05 = f["half_map_fsc_0.143_px"], f.get("half_map_fsc_0.5_px")
        limit_px = box_px / max_paired_radius_px(box_px)  # the finest period the maps hold
        said = f"  resolution: {res * pixel_size_a:.1f} A at half-map FSC=0.143"
        if res_05 is not None:
            said += f", {res_05 * pixel_size_a:.1f} A at 0.5"
        if res <= limit_px + 1e-6:
            said += (
                f" (limited by the box: {limit_px * pixel_size_a:.1f} A is the finest the maps hold at "
                f"{pixel_size_a:g} A per pixel; finer pixels could go further)"
            )
        lines.append(said)
    if out.get("symmetry", "C1") != "C1":
        lines.append(f"  symmetry: {out['symmetry']} imposed (map and poses in RELION's frame for it)")
    if result.kept is not None:
        junk = int((~result.kept).sum())
        lines.append(f"  particles: {n_particles - junk} of {n_particles} in the map, {junk} called junk")
    else:
        lines.append(f"  particles: {n_particles}")
    times = []
    for stage, name in _TIMED:
        record = result.stage(stage)
        if record is not None and record.figures.get("seconds") is not None:
            seconds = record.figures["seconds"]
            if stage == "reconstruction" and result.stage("junk") is not None:
                seconds -= result.stage("junk").figures.get("seconds", 0.0)  # (timed within it)
            times.append(f"{name} {seconds:.0f} s")
    lines.append(f"  time: {out['minutes']:.1f} min" + (f" ({', '.join(times)})" if times else ""))
    if result.warnings:
        lines.append(f"  warnings: {len(result.warnings)} (above, and in outputs.json)")
    lines.append(
        f"  map: {out['volume']}" + (" and its half maps" if result.maps and result.maps[0].half_maps else "")
    )
    if "poses" in out:
        lines.append(
            f"  poses: {out['poses']} (RELION) and {Path(out['poses']).with_suffix('.cs')} (cryoSPARC)"
        )
    return lines


def fitting_loop(table: ParticleTable, cfg: TrainConfig, outdir: str | Path, *, device=None,
                 poses: Poses | None = None, quiet: bool = True) -> Trainer:
    """The run's gradient loop alone, built as :func:`run_default` builds it (the images scaled
    and whitened, the model drawn from the seed), at fixed ``poses`` or, with None, with the
    encoder (amortized training): for benchmarks of a training step and for tests.
    """
    device = torch.device(device if device is not None else "cpu")
    Path(outdir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dataset = ParticleDataset(table, scale=check_inputs(table, cfg))
    dataset = dataset.variant(noise=noise_stage(Particles(table, dataset, None, device), cfg).noise)
    model = new_model(cfg, dataset, with_encoder=poses is None, device=device)
    return Trainer(model, new_optimizer(model, cfg), dataset, cfg, RunDirectory(outdir), device=device,
                   state=TrainState(), poses=poses, quiet=quiet)


def _broadcast_poses(poses: Poses, dist: DistInfo) -> None:
    """Under torchrun: every rank holds rank 0's poses."""
    if dist.enabled:
        broadcast_(poses.rotations, dist)
        broadcast_(poses.shifts_a, dist)


def _encoder_from_given_poses(
    particles: Particles,
    cfg: TrainConfig,
    poses: Poses,
    fourier_volume: torch.Tensor,
    state: TrainState,
    dist: DistInfo,
    run: _Run,
) -> EncoderRecord:
    """``--poses``: the encoder stage on the reconstruction and the given poses of up to
    ``search_subset`` particles, so that ``predict-poses`` can use it (``--pose-encoder always``:
    the run itself poses no particle with it).
    """
    wanted, why = decisions.encoder_wanted(cfg.pose_encoder, 0)
    if not wanted or not dist.is_main:
        return run.done(EncoderRecord("encoder", said=(why,) if why and dist.is_main else ()))
    rng = np.random.default_rng(cfg.seed)
    n = len(particles.table)
    rows = np.sort(rng.choice(n, size=min(cfg.search_subset, n), replace=False))
    spectra, ctf = particles.spectra().read(rows)
    chosen = poses.select(rows)
    encoder = encoder_stage(
        particles,
        cfg,
        fourier_volume,
        spectra,
        ctf,
        chosen.rotations.to(particles.device),
        (chosen.shifts_a / particles.pixel_size_a).to(particles.device),
        minutes_before=state.minutes,
        particles_to_pose=0,  # (every particle has its pose: trained only when asked)
        say=run.say,
        progress=run.progress,
    )
    state.minutes += encoder.figures.get("seconds", 0.0) / 60
    run.done(encoder, state.minutes)
    return encoder


def particle_columns(junk: JunkRecord | None, classes: ClassesRecord | None) -> dict[str, np.ndarray] | None:
    """poses.star's per-particle columns of the junk stage (``rlnCryoaiJunk`` 1 for junk, the
    scores of :mod:`cryoai.reconstruction.particle_scores`) and of the 3D classes:
    ``rlnClassNumber`` is each particle's class (``--classes K``), or else 1 for the particles
    kept and 2 for junk.
    """
    columns = (
        {}
        if classes is None
        else {
            "rlnClassNumber": classes.classes + 1,
            "rlnCryoaiClassProbability": np.round(classes.probability, 4),
        }
    )
    if junk is None:
        return columns or None
    if classes is None:
        columns = {"rlnClassNumber": np.where(junk.kept, 1, 2)}
    return {
        **columns,
        "rlnCryoaiJunk": (~junk.kept).astype(np.int64),
        "rlnCryoaiScore": np.round(junk.scores.score, 3),
        "rlnCryoaiAmplitude": np.round(junk.scores.amplitude, 4),
        "rlnCryoaiResidualExcess": np.round(junk.scores.residual_excess, 3),
        "rlnCryoaiJunkDistance": np.round(junk.distance, 3),
    }


def stage_payload(
    poses: Poses | None,
    encoder: EncoderRecord,
    junk: JunkRecord | None,
    classes: ClassesRecord | None,
    views_balanced: bool,
    working_box: dict | None = None,
    symmetry: str = "C1",
) -> dict:
    """The stages' results a checkpoint keeps, so that a resumed run and predict-poses find them
    (``working_box``: the box the particles were posed at and the images' scale there, where
    not the full box; ``symmetry``: the point group imposed).
    """
    extra: dict = {"views_balanced": views_balanced, "symmetry": symmetry}
    if working_box is not None:
        extra["working_box"] = dict(working_box)
    if poses is not None:
        extra.update(pose_rotations=poses.rotations, pose_shifts_a=poses.shifts_a)
    if junk is not None:
        extra["kept"] = torch.from_numpy(junk.kept)
        extra["scores"] = {
            k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in junk.scores.__dict__.items()
        }
        extra["junk_distance"] = torch.from_numpy(junk.distance)
    if classes is not None:
        extra["classes"] = torch.from_numpy(classes.classes)
        extra["class_probability"] = torch.from_numpy(classes.probability)
        extra["class_info"] = list(classes.info)
        if classes.poses is not None:
            extra.update(class_rotations=classes.poses.rotations, class_shifts_a=classes.poses.shifts_a)
    if encoder.encoder is not None:
        extra["pose_encoder"] = {
            "settings": encoder.encoder.settings,
            "state": {k: v.cpu() for k, v in encoder.encoder.state_dict().items()},
            "check": encoder.check,
        }
    return extra


def restored_stages(ckpt: dict, device) -> dict:
    """The stages' results of a checkpoint (:func:`stage_payload`), as the run's records."""
    saved: dict = {"views_balanced": bool(ckpt.get("views_balanced", False)),
                   "symmetry": str(ckpt.get("symmetry", "C1"))}
    if "prior_lam" in ckpt:
        saved["prior_lam"] = ckpt["prior_lam"].to(device)
    if ckpt.get("pose_encoder"):
        encoder: PoseGridEncoder = load_pose_encoder(ckpt["pose_encoder"], device)
        check = ckpt["pose_encoder"].get("check")
        saved["encoder"] = EncoderRecord(
            "encoder", encoder=encoder, check=check, used=bool((check or {}).get("used"))
        )
    if "kept" in ckpt:
        scores = ParticleScores(
            **{
                k: v.cpu().numpy().astype(np.float64) if torch.is_tensor(v) else v
                for k, v in ckpt["scores"].items()
            }
        )
        saved["junk"] = JunkRecord(
            "junk",
            kept=ckpt["kept"].cpu().numpy().astype(bool),
            scores=scores,
            distance=ckpt["junk_distance"].cpu().numpy().astype(np.float64),
        )
    if "classes" in ckpt:
        saved["classes"] = ClassesRecord(
            "classes",
            classes=ckpt["classes"].cpu().numpy().astype(np.int64),
            probability=ckpt["class_probability"].cpu().numpy().astype(np.float64),
            info=tuple(ckpt["class_info"]),
            poses=Poses(ckpt["class_rotations"].float().cpu(), ckpt["class_shifts_a"].float().cpu())
            if "class_rotations" in ckpt else None,
        )
    if "pose_rotations" in ckpt:  # the searched poses
        saved["poses"] = Poses(ckpt["pose_rotations"].float().cpu(), ckpt["pose_shifts_a"].float().cpu())
    return saved
