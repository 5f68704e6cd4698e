"""``cryoai train``: the run as a sequence of stages.

:meth:`Trainer.run` reads top to bottom:

1. **poses**: given (``--poses``), or none (``--ab-initio encoder``: the encoder learns them,
   the paper's amortized training), or, by default, found in three steps:

   a. **search** a subset (:func:`cryoai.reconstruction.search_subset`): its map and poses,
      from a blob, a given map (``--initial-map``) or, for images that carry little signal
      each, a map posed from the subset's 2D class averages (``--search-start``); a search from
      a blob whose views come out preferred is done again from class averages; the run first
      says its plan (subset, start, band schedule, batch: :meth:`Trainer._say_search_plan`);
   a'. **balanced views**: where the subset's views are preferred, its poses are refined against
      maps that weigh every direction of views alike (:mod:`cryoai.reconstruction.view_balance`),
      and the balanced map is the one the other particles are posed against;
   b. **encoder**: a pose encoder learns from that map and those poses, and is checked
      against the search on held-out subset particles (:mod:`cryoai.training.encoder_fit`);
   c. **assignment**: every other particle is posed against the subset's map, from the
      encoder's hypotheses when its check passed, else by the global search (said), then
      refined locally (:func:`cryoai.reconstruction.assign_remaining`). Every global first
      guess (this one, the 2D classes', the junk stage's) scores its hypotheses in a band
      chosen once from the images' measured signal (:func:`first_guess_band`);
2. **reconstruct**: with poses, the half-map FSC-regularised reconstruction
   (:func:`cryoai.reconstruction.reconstruct`) of every particle; by default the junk is then
   called and given a second look (:mod:`cryoai.reconstruction.junk_sorting`), and the map of
   the particles kept starts the decoder and writes the half maps (with ``--poses``, the
   encoder stage then learns from this map); ``--classes K`` adds K 3D classes at these poses
   (:mod:`cryoai.reconstruction.classes3d`);
3. **fit**: mini-batch gradient descent on the images (decoder, and encoder when it learns
   the poses), until ``max_epochs``/``decoder_epochs`` (at most ``decoder_max_images``) or
   ``max_minutes``;
4. **write**: the map, the checkpoint (with the pose encoder, for ``cryoai predict-poses``)
   and the poses.

The mode is decided once, from the options: ``"given"``, ``"search"`` or ``"amortized"``.
The run directory (:class:`cryoai.training.run_dir.RunDirectory`) writes every file;
``--resume`` restores the model, the optimiser, the step and the searched poses from the
checkpoint and continues mid-epoch with the same batches. SIGINT finishes the step in flight
and saves; a NaN loss or gradient stops before the parameters are touched.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.dataset import ParticleBatch, ParticleDataset, ParticleSubset, estimate_scale
from ..data.loader import make_loader
from ..data.noise import measure_noise
from ..errors import CryoaiError, InputError
from ..evaluation.metrics import pose_agreement
from ..evaluation.report import SCF_WARNING
from ..io.images import ImageSource
from ..io.mrc import read_volume
from ..io.particles import ParticleTable
from ..models.cryoai import CryoAI, build_model, estimate_amplitude_profile
from ..models.decoders import decoder_to_volume
from ..models.encoder import PoseGridEncoder
from ..models.image_formation import ImageFormation
from ..physics.fft import ifft3_c
from ..physics.fsc import resolution_px
from ..physics.grids import max_paired_radius_px
from ..physics.masks import circular_mask, map_mask_radius_px
from ..physics.poses import Poses
from ..reconstruction import (
    AssignSettings,
    ParticleSpectra,
    PoseAssigner,
    SearchSettings,
    assign_remaining,
    assign_settings,
    repose_subset,
    search_subset,
    starting_map,
)
from ..reconstruction.classes3d import Classes3DSettings, classify_3d
from ..reconstruction.junk_sorting import JunkSortSettings, score_band_px, sort_junk
from ..reconstruction.particle_scores import (
    ParticleScores,
    explained_signal,
    micrograph_amplitude,
    score_particles,
    score_spectra,
)
from ..reconstruction.regularised import (
    INVERTED_SKEWNESS,
    density_skewness,
    half_set_sums,
    reconstruction_from_sums,
)
from ..reconstruction.view_balance import refine_balanced
from ..simulate.views import sampling_compensation_factor
from .config import TrainConfig
from .decoder_fit import fit_decoder_to_fourier_volume
from .distributed import DistInfo, any_true, broadcast_, data_parallel_loss, weighted_mean
from .encoder_fit import (
    MIN_AMORTIZED_FRACTION,
    MIN_SPEEDUP,
    EncoderSettings,
    check_pose_encoder,
    train_pose_encoder,
)
from .losses import pose_loss_terms
from .poses import encoder_hypotheses, iter_poses
from .run_dir import RunDirectory


class TrainingDiverged(CryoaiError):
    """The loss became NaN or infinite."""


#: The images' whitened signal energy within 10 px (:meth:`cryoai.data.noise.NoiseModel.information`,
#: averaged over every pick, junk included) below which a run warns that its map and poses may be
#: wrong: the search failed on every set at 93 or less; between 215 and 274 it failed or converged
#: depending on the rest (it converged at 241 with half the picks junk, failed at 215 with
#: structural and coloured noise); it converged on every set at 274 or more (docs/realistic-data.md).
LOW_SIGNAL_ENERGY = 150.0

#: The same for a search started from a given map (``--initial-map``): from the true map blurred
#: to 60-80 A it posed a set at 93 (2.1 deg) and failed on one at 14 (docs/realistic-data.md,
#: section 7).
LOW_SIGNAL_ENERGY_WITH_START = 50.0

#: The same for a search started from the subset's 2D class averages: it posed the 70S
#: noise-alone sets at 90-96 (sections 8 and 10) and a CFTR-sized membrane set at 97 (5.1 deg),
#: and, since the 2D classification anneals its noise (section 14), that map's membrane sets at
#: 82 (4.3 deg) and 61 (5.9 deg, its map 1.47x the known poses'); it failed at 44 (the 2D classes
#: no better than random, annealed or not), 17, and at 48 px at 27 and 14 (sections 10, 12, 14).
LOW_SIGNAL_ENERGY_FROM_CLASSES = 55.0

#: A search started from 2D class averages whose map explains less than this share of the
#: subset's signal is doubtful: it is run again from another seed (``search_retries`` times at
#: most), and, if no attempt explains more, the run says so with how far the attempts' poses
#: agree. Converged searches from class averages explained 0.84-0.96 (the 70S large-complex,
#: junk-alone and noise-alone sets, the CFTR-sized membrane sets; the true poses explain 0.88-1.0
#: in the same band), failed ones 0.70-0.78 (a CFTR-sized membrane set at energies 81 and 98,
#: three seeds, posed 20-108 deg off with no warning before; docs/realistic-data.md, section
#: 13), and one at 0.80 half converged (9 deg, its map 1.9x the known poses'; section 14).
DOUBTFUL_EXPLAINED_FROM_CLASSES = 0.82
#: The shares explained that border rests on, as the run states them.
_CONVERGED_EXPLAINED = "84-96%"
_FAILED_EXPLAINED = "70-80%"
#: Two searches agree when this share of the particles both posed is placed alike (within
#: 10 deg, up to a global rotation and mirror: :func:`cryoai.evaluation.metrics.pose_agreement`).
AGREEING_SHARE = 0.5

#: ``--search-start auto`` starts from class averages below this whitened signal energy per
#: image within 10 px: the search from a blob converged on every set measured with 274 or more
#: and failed on every one with 215 or less (docs/realistic-data.md, sections 6 and 8).
CLASS_START_ENERGY = 250.0
#: Below this whitened signal energy per image within the search's final band (10 px), the
#: global first guesses (the assignment stage against the search's map, the junk stage's
#: second look, predict-poses, and the 2D classes' in-plane search) score their hypotheses in
#: the refinement's final band instead: what the images say about their pose beyond 10 px is
#: what tells their right pose from a wrong one. Against the true map of the noise-alone set
#: (93 within 10 px, 125 within 14 px), 61% of the real particles were posed within 10 deg at
#: 10 px and 95% at 14 px; against a run's map, 52% and 87%. At 215 (large-complex) 10 px
#: already posed 91% (94% at 14 px), and the wider band let empty images fit their noise
#: better, so that fewer were called junk (recall 0.79 against 0.88 on one seed): the same
#: border as :data:`LOW_SIGNAL_ENERGY` (docs/realistic-data.md, section 10).
WIDE_FIRST_GUESS_ENERGY = 150.0
#: ... and only where the wider band adds at least this factor of the energy: its coefficients
#: (about as many again as within 10 px) are so many more ways for the noise to match a wrong
#: hypothesis. The 70S sets' wider band adds a third (93 -> 125 noise alone, factor 1.34; the
#: whole hostile recipe 1.20) and their poses and classes came out better in it; a CFTR-sized map
#: at 3 A and 64 px under structural noise and junk gains a tenth (98 -> 108, 1.10), and there
#: the search from class averages made in the wider band failed on three seeds (20-108 deg off)
#: and, in 10 px, converged (docs/realistic-data.md, section 13).
WIDE_BAND_MIN_GAIN = 1.15


class _BestState:
    """``keep_best``: the decoder's state (its regularised start included) that predicts the
    held-out particles best (:meth:`Trainer.held_out_loss`), judged at the start, about ten times
    during the fit and at its end; the run ends with it. With fixed poses the regularised
    reconstruction is the optimum of the same objective, and gradient steps on noisy
    mini-batches can only drift from it (on CFTR: 3.41 px after 2 epochs, 3.95 px after 24).
    """

    def __init__(self, trainer: Trainer, total_steps: int):
        self.trainer = trainer
        self.rows = trainer._held_out_rows()
        self.every = max(20, total_steps // 10)
        self.best_loss, self.best_step, self.best_state = math.inf, None, None
        self.last_step = None
        if self.rows is not None and trainer.state.step < total_steps:
            self._evaluate()

    def _evaluate(self) -> None:
        t = self.trainer
        loss = t.held_out_loss(self.rows)
        self.last_step = t.state.step
        t.run_dir.log({"step": t.state.step, "held_out_loss": loss, "held_out_particles": len(self.rows)})
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, t.state.step
            self.best_state = {k: v.detach().clone() for k, v in t.model.decoder.state_dict().items()}

    def step(self) -> None:
        """Called after each optimiser step."""
        if self.rows is not None and self.trainer.state.step % self.every == 0:
            self._evaluate()

    def restore_if_better(self) -> None:
        """At the fit's end: the best state back into the decoder (and said) if it is not the last."""
        t = self.trainer
        if self.rows is None or self.best_state is None:
            return
        if self.last_step != t.state.step:
            self._evaluate()
        if self.best_step == t.state.step:
            return
        t.model.decoder.load_state_dict(self.best_state)
        t._log(f"keep-best: the decoder's state at step {self.best_step} predicts the {len(self.rows)} "
               f"held-out particles best (loss {self.best_loss:.6g}); the run ends with it")
        t.run_dir.log({"stage": "keep_best", "best_step": self.best_step,
                       "best_held_out_loss": self.best_loss, "steps": t.state.step})


@dataclass
class TrainState:
    """Where a run stands (saved in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    minutes: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        """The state of a checkpoint (keys of older versions ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class _StopOnSigint:
    """While active, the first SIGINT (Ctrl-C) only sets ``requested`` so that the training
    loop stops at the end of the step in flight; a second one interrupts at once. Does
    nothing outside the main thread.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSigint:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def check_inputs(table: ParticleTable, cfg: TrainConfig, given_poses: ParticleTable | None = None,
                 source: ImageSource | None = None) -> float:
    """Everything that can be checked before a run starts, so that a bad input fails before
    anything is written: the stacks (exist, MRC, mode, box, length), a sample of the images
    (NaN, infinite or blank images: the ``normalize_samples`` images of the intensity scale,
    and the first and last) and the given poses.

    Returns
    -------
    The global intensity scale of the images (:func:`estimate_scale`), to pass to
    :class:`Trainer` so that the sample is read once.

    Raises
    ------
    InputError
        One line naming the file and the problem.
    """
    source = source or ImageSource(table)
    source.validate()
    if cfg.initial_map:
        read_initial_map(cfg.initial_map, table.box_px, table.median_pixel_size_a())
    source.read(np.unique([0, len(table) - 1]))
    scale = estimate_scale(table, cfg.normalize_samples, cfg.seed, source=source)
    if given_poses is not None and (len(given_poses) != len(table) or not given_poses.has_poses):
        raise InputError(f"{given_poses.source_path}: --poses must hold poses for the same "
                         f"{len(table)} particles (it has {len(given_poses)}"
                         f"{'' if given_poses.has_poses else ', without poses'})")
    return scale


def read_initial_map(path: str, box_px: int, pixel_size_a: float) -> np.ndarray:
    """The map of ``--initial-map``, checked against the particles: the same box, and the same
    voxel size within 1% where its header gives one (an unset one, 0, is taken as theirs).

    Raises
    ------
    InputError
        One line naming the file and the problem.
    """
    volume, voxel_a = read_volume(path)
    if volume.shape[-1] != box_px:
        raise InputError(f"{path}: box {volume.shape[-1]} differs from the particles' {box_px} "
                         "(resample the map to their box first)")
    if voxel_a > 0 and abs(voxel_a - pixel_size_a) > 0.01 * pixel_size_a:
        raise InputError(f"{path}: voxel size {voxel_a:.3f} A differs from the particles' "
                         f"{pixel_size_a:.3f} A (resample the map first)")
    if not np.isfinite(volume).all() or float(np.abs(volume).max()) == 0:
        raise InputError(f"{path}: the map is empty or holds NaN/infinite values")
    return volume


def search_settings(cfg: TrainConfig, box_px: int) -> SearchSettings:
    """The pose search's options from the run's."""
    return SearchSettings(
        subset=cfg.search_subset, n_rotations=cfg.search_rotations, iterations=cfg.search_iterations,
        batch=cfg.search_batch, stop_posterior=cfg.search_stop_posterior, ema=cfg.search_ema,
        radius_start_px=cfg.search_radius_start, radius_end_px=cfg.search_radius_end,
        max_shift_px=(cfg.search_max_shift_px if cfg.search_max_shift_px is not None else 0.12 * box_px),
        shift_step_px=cfg.search_shift_step_px, refine_rounds=cfg.refine_rounds,
        refine_candidates=cfg.refine_candidates, refine_radius_frac=cfg.refine_radius_frac,
        class_radius_px=cfg.assign_radius_px,  # the 2D classes' in-plane first guesses: the same band
        mask_radius_px=map_mask_radius_px(box_px, cfg.mask_radius_frac), seed=cfg.seed)


def assignment_settings(cfg: TrainConfig, box_px: int) -> AssignSettings:
    """How particles are posed against a run's map (the assignment stage, predict-poses)."""
    settings = assign_settings(search_settings(cfg, box_px), rounds=cfg.assign_refine_rounds,
                               candidates=cfg.assign_refine_candidates, method=cfg.assign_refine_method,
                               radius_frac=cfg.assign_refine_radius_frac, hypotheses=cfg.encoder_hypotheses,
                               prune_keep=cfg.assign_prune_keep)
    if cfg.assign_radius_px is not None:
        settings = replace(settings, radius_px=float(cfg.assign_radius_px))
    return settings


def first_guess_band(cfg: TrainConfig, box_px: int, noise) -> tuple[float | None, dict | None]:
    """The band (frequency px) the data ask of the assignment's global first guess, and what
    the choice rests on (for the run's log): ``(cfg.assign_radius_px, None)`` when it is given
    or the images' signal is unknown; ``(None, figures)`` (the search's final band) when the
    images' whitened signal energy within that band is at least
    :data:`WIDE_FIRST_GUESS_ENERGY`, or when the wider band adds less than
    :data:`WIDE_BAND_MIN_GAIN` of it; else the refinement's final band
    (``assign_refine_radius_frac`` of the largest paired radius), where it is the wider.

    ``noise`` : the run's :class:`cryoai.data.noise.NoiseModel`, or None.
    """
    if cfg.assign_radius_px is not None or noise is None:
        return cfg.assign_radius_px, None
    base_px = float(cfg.search_radius_end)
    wide_px = round(cfg.assign_refine_radius_frac * max_paired_radius_px(box_px), 2)
    energy = noise.information(base_px)
    wide_energy = noise.information(wide_px)
    figures = {"stage": "assignment_band", "search_band_px": base_px,
               "energy_in_search_band": round(energy, 1), "wide_band_px": wide_px,
               "energy_in_wide_band": round(wide_energy, 1), "threshold": WIDE_FIRST_GUESS_ENERGY,
               "min_gain": WIDE_BAND_MIN_GAIN}
    if not energy < WIDE_FIRST_GUESS_ENERGY or not wide_px > base_px \
            or not wide_energy >= WIDE_BAND_MIN_GAIN * energy:
        return None, {**figures, "first_guess_band_px": base_px}
    return wide_px, {**figures, "first_guess_band_px": wide_px}


def encoder_min_confidence(check: dict | None, cfg: TrainConfig) -> float:
    """The confidence below which a particle gets the global first guess: the check's
    calibration, or 0 (none) with ``--pose-encoder always``.
    """
    if cfg.pose_encoder == "always" or not check:
        return 0.0
    return float(check.get("min_confidence", 0.0))


def load_pose_encoder(payload: dict | None, device) -> PoseGridEncoder | None:
    """The pose encoder saved in a checkpoint (``payload`` = its ``"pose_encoder"`` entry)."""
    if not payload:
        return None
    encoder = PoseGridEncoder(**payload["settings"])
    encoder.load_state_dict(payload["state"])
    return encoder.to(device).eval()


class Trainer:
    """A run of ``cryoai train`` on a particle table, writing to ``outdir`` (see the module
    docstring for its stages).

    Parameters
    ----------
    table : the particles.
    cfg : the options.
    outdir : the run directory (created by the caller).
    device : torch device.
    fixed_poses : a table with the poses to hold fixed (reconstruction with known poses), or None.
    resume : continue from ``outdir/checkpoint.pt``.
    quiet : no progress bar or log lines.
    argv : the command line, saved in checkpoints.
    dist_info : this process's rank under torchrun.
    scale : the images' intensity scale from :func:`check_inputs`; None: the inputs are
        checked here.
    """

    def __init__(self, table: ParticleTable, cfg: TrainConfig, outdir: str | Path, *,
                 device: torch.device, fixed_poses: ParticleTable | None = None,
                 resume: bool = False, quiet: bool = False, argv: list[str] | None = None,
                 dist_info: DistInfo | None = None, scale: float | None = None):
        self.dist = dist_info or DistInfo()
        self.is_main = self.dist.is_main
        self.quiet = quiet or not self.is_main
        self.table, self.cfg, self.device = table, cfg, device
        self.argv = argv or sys.argv
        self.mode = "given" if fixed_poses is not None else \
            {"search": "search", "encoder": "amortized"}[cfg.ab_initio]
        if cfg.classes > 1 and self.mode != "search":
            raise InputError(f"--classes {cfg.classes}: the 3D classes are made at the poses the default "
                             "run searches (not with --poses or --ab-initio encoder)")
        self.run_dir = RunDirectory(outdir, writes=self.is_main, tensorboard=cfg.tensorboard,
                                    fresh=not resume)
        self.outdir = self.run_dir.path
        # Model initialisation draws from the global generators.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        self.box = table.box_px
        self.pixel_size_a = table.median_pixel_size_a()
        self.source = ImageSource(table)
        ckpt = self.run_dir.load_checkpoint(device) if resume else None
        if ckpt is not None:
            self.scale = float(ckpt["scale"])
        elif scale is not None:
            self.scale = scale
        else:
            self.scale = check_inputs(table, cfg, fixed_poses, source=self.source)
        self.dataset = ParticleDataset(table, invert_contrast=cfg.invert_contrast, scale=self.scale,
                                       source=self.source)
        self.noise_summary: dict = {}
        self.first_guess_figures: dict = {}  # the first-guess band's choice (first_guess_band)
        self.noise_free = False
        self._measure_noise()
        self._choose_first_guess_band()
        # The poses: given now, searched in stage 1, or None (the encoder predicts them).
        self.poses: Poses | None = fixed_poses.poses() if fixed_poses is not None else None
        self.model = self._build_model()
        self.prior_lam: torch.Tensor | None = None  # the voxel decoder's MAP prior (reconstruct)
        self.pose_encoder: PoseGridEncoder | None = None  # the encoder stage's (None: not trained)
        self.search_explained = float("nan")  # the share of the signal the search's map explains
        self.views_balanced = False  # whether the subset's poses were refined against balanced maps
        self.kept: np.ndarray | None = None  # (n,) bool: the particles not called junk (None: all)
        self.scores: ParticleScores | None = None
        self.junk_distance: np.ndarray | None = None
        self.classes: np.ndarray | None = None  # (n,) int: each particle's 3D class, 0 = the largest
        self.class_probability: np.ndarray | None = None
        self.class_info: list[dict] = []  # per class: particles, junk called, resolution
        self.encoder_check: dict | None = None
        self.mask = None  # the encoder input's circular mask
        if cfg.mask_radius_frac > 0:
            self.mask = circular_mask(self.box, cfg.mask_radius_frac * self.box, soft_edge_px=3,
                                      device=device)
        self.optimizer = self._build_optimizer()
        self.state = TrainState()
        if ckpt is not None:
            self._restore(ckpt)
        self.last_checkpoint_step = self.state.step
        self.last_grad_norm = float("nan")
        self.warnings: list[str] = []  # said on stderr as they happen, and in outputs.json
        self.last_global_batch = 0
        self.ddp = None
        if self.dist.enabled:
            unused = self.model.encoder is not None and not cfg.learn_shifts  # the shift head
            self.ddp = data_parallel_loss(self.model, self.loss_on_batch, device,
                                          find_unused_parameters=unused)

    def _measure_noise(self) -> None:
        """The noise spectrum on the images' background (``--noise-model``); the data set
        whitens by it from here on (:mod:`cryoai.data.noise`).
        """
        t0 = time.perf_counter()
        radius_px = map_mask_radius_px(self.box, self.cfg.mask_radius_frac)
        noise = measure_noise(self.dataset, self.cfg.noise_model, radius_px, seed=self.cfg.seed)
        self.dataset.noise = noise
        self.noise_free = noise is None and self.cfg.noise_model != "white"
        if noise is None:
            if self.noise_free:
                self._log("noise: the images' background holds no measurable noise: not whitened")
            return
        self.noise_summary = {**noise.summary(), "noise_seconds": round(time.perf_counter() - t0, 2)}
        s = self.noise_summary
        self._log(f"noise: spectra of {s['noise_groups']} group(s) measured on the background of "
                  f"{s['noise_images_measured']} images ({noise.kind}); low/high-frequency power "
                  f"{s['noise_low_over_high_power']:.2f} (1 = white), levels spread "
                  f"{s['noise_level_spread']:.2f}x; the images are whitened by them")

    def _choose_first_guess_band(self) -> None:
        """The assignment's first-guess band from the images' measured signal
        (:func:`first_guess_band`), kept in the run's options (config.yaml, the checkpoint: so
        predict-poses poses new particles in the same band) and said.
        """
        band_px, figures = first_guess_band(self.cfg, self.box, self.dataset.noise)
        if figures is None:
            return
        self.first_guess_figures = figures
        energy, wide = figures["energy_in_search_band"], figures["energy_in_wide_band"]
        base_px, wide_px = figures["search_band_px"], figures["wide_band_px"]
        if band_px is None and energy < WIDE_FIRST_GUESS_ENERGY and wide_px > base_px:
            self._log(f"assignment: the images' whitened signal energy within {base_px:g} px "
                      f"is {energy:.0f} per image (below {WIDE_FIRST_GUESS_ENERGY:.0f}), but the wider "
                      f"{wide_px:g} px band adds little to it ({wide:.0f}, less than "
                      f"{WIDE_BAND_MIN_GAIN:g}x): their poses (and 2D classes) are first guessed within "
                      f"{base_px:g} px")
        if band_px is not None:
            self.cfg = replace(self.cfg, assign_radius_px=band_px)
            self._log(f"assignment: the images' whitened signal energy within {figures['search_band_px']:g} "
                      f"px is {figures['energy_in_search_band']:.0f} per image (below "
                      f"{WIDE_FIRST_GUESS_ENERGY:.0f}): their poses (and 2D classes) are first guessed "
                      f"within {band_px:g} px ({figures['energy_in_wide_band']:.0f} there)")

    def _build_model(self) -> CryoAI:
        profile = None
        if self.cfg.decoder == "voxel":
            # The voxel decoder's amplitude preconditioner, from the data's radial power.
            sample = self.dataset.read(np.arange(min(len(self.table), 256)))
            profile = estimate_amplitude_profile(ImageFormation(self.box, self.pixel_size_a), sample)
        return build_model(self.cfg, self.box, self.pixel_size_a, with_encoder=self.mode == "amortized",
                           amplitude_profile=profile, device=self.device).to(self.device)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = [{"params": list(self.model.decoder.parameters()), "name": "decoder",
                   "lr": cfg.lr_voxel if cfg.decoder == "voxel" else cfg.lr_decoder}]
        if self.model.encoder is not None:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": cfg.lr_encoder,
                           "name": "encoder"})
        return torch.optim.Adam(groups, amsgrad=cfg.amsgrad)

    def _restore(self, ckpt: dict) -> None:
        if "prior_lam" in ckpt:
            self.prior_lam = ckpt["prior_lam"].to(self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState.from_dict(ckpt["state"])
        self.run_dir.truncate_logs(self.state.step)
        if ckpt.get("pose_encoder"):
            self.pose_encoder = load_pose_encoder(ckpt["pose_encoder"], self.device)
            self.encoder_check = ckpt["pose_encoder"].get("check")
        self.views_balanced = bool(ckpt.get("views_balanced", False))
        if "kept" in ckpt:
            self.kept = ckpt["kept"].cpu().numpy().astype(bool)
            self.scores = ParticleScores(**{k: v.cpu().numpy().astype(np.float64) if torch.is_tensor(v) else v
                                            for k, v in ckpt["scores"].items()})
            self.junk_distance = ckpt["junk_distance"].cpu().numpy().astype(np.float64)
        if "classes" in ckpt:
            self.classes = ckpt["classes"].cpu().numpy().astype(np.int64)
            self.class_probability = ckpt["class_probability"].cpu().numpy().astype(np.float64)
            self.class_info = list(ckpt["class_info"])
        if "pose_rotations" in ckpt:  # the searched poses
            self.poses = Poses(ckpt["pose_rotations"].float().cpu(), ckpt["pose_shifts_a"].float().cpu())

    # ------------------------------------------------------------------ the run
    def run(self, *, on_volume=None) -> dict:
        """The run's stages, in order; returns the paths of its outputs and its figures.

        ``on_volume(trainer)`` is called after each write of the map (e.g. to compute an FSC).
        """
        self.run_dir.write_config(self.cfg)
        if self.noise_summary:
            self.run_dir.log({"stage": "noise", **self.noise_summary})
        if self.first_guess_figures:
            self.run_dir.log(self.first_guess_figures)
        if self.mode == "search" and self.poses is None:
            found = self.balance_preferred_views(self.search_subset())
            use_encoder = self.learn_pose_encoder(found.fourier_volume, found.spectra, found.ctf,
                                                  found.rotations, found.shifts_px)
            self.poses = self.assign_remaining(found, use_encoder)
            self.checkpoint()
        if self.poses is not None and self.state.step == 0 and self.cfg.wiener_init:
            rec = self.start_decoder_from_reconstruction()
            if self.mode == "given" and self.pose_encoder is None:
                self.learn_pose_encoder_from_given_poses(rec.fourier_volume)
            if self.cfg.classes > 1:
                self.classify_3d(rec)
            self.checkpoint()
        self._sync_from_rank0()
        self.fit(on_volume)
        return self.write_outputs(on_volume)

    def search_subset(self):
        """Stage 1a (default mode): the search on its subset: a map and the subset's poses.

        A search whose map explains less than ``min_explained`` of the signal the subset's
        images carry (:func:`cryoai.reconstruction.particle_scores.explained_signal`) is taken
        for a wrong start and run again from another seed, ``search_retries`` times at most;
        the best is kept, with a warning if it is still below. A search from class averages
        below :data:`DOUBTFUL_EXPLAINED_FROM_CLASSES` is doubtful and run again the same way;
        if the best is still doubtful, the run warns, saying how far the attempts' poses agree.
        A blob's search whose views came out preferred runs again from class averages; it is
        kept if those fail or stay doubtful and it explains more than they do.
        """
        cfg = self.cfg
        best, attempts = None, []
        tried = []  # (subset, rotations, explained) of every attempt (not their spectra)
        classes_tried = []  # the share explained by each attempt from class averages
        t_all = time.perf_counter()
        start = self._starting_map()  # read and low-passed once for every attempt
        info = self.dataset.noise.information(10.0) if self.dataset.noise is not None else float("nan")
        if start is None:
            start = self._search_start(info)
        self._say_search_plan(search_settings(cfg, self.box), start)
        for attempt in range(cfg.search_retries + 1):
            deadline = None if cfg.max_minutes is None else \
                time.perf_counter() + (cfg.max_minutes - self.state.minutes) * 60
            if deadline is not None and attempt > 0 and time.perf_counter() >= deadline:
                break
            settings = replace(search_settings(cfg, self.box), seed=cfg.seed + 1000 * attempt)
            found = search_subset(self._spectra(), settings, log=self._log, deadline=deadline, start=start)
            found = self._handle_inverted_contrast(found)
            # The subset posed afresh against the search's final map (pose_search.repose_subset),
            # by the exhaustive global search: these poses teach and check the encoder.
            t0 = time.perf_counter()
            exhaustive = replace(assignment_settings(cfg, self.box), prune_keep=0)
            found = repose_subset(found, PoseAssigner(self.model.formation, found.fourier_volume, exhaustive))
            repose_seconds = time.perf_counter() - t0
            self.state.minutes += (found.seconds + repose_seconds) / 60
            explained = self._explained(found, settings.radius_end_px)
            scf = sampling_compensation_factor(found.rotations.double().cpu().numpy())
            attempts.append(explained)
            kind = start if isinstance(start, str) else "blob" if start is None else "map"
            self.run_dir.log({"stage": "search", "attempt": attempt + 1, "seed": settings.seed, "start": kind,
                              "minutes": self.state.minutes, "search_seconds": found.seconds + repose_seconds,
                              "repose_seconds": repose_seconds, "subset": len(found.subset),
                              "explained_signal": explained, "views_scf": scf,
                              "time_limit_reached": found.time_limit_reached})
            passed = not explained < cfg.min_explained  # (NaN: unknown, no noise model: accept)
            tried.append((found.subset, found.rotations.detach().double().cpu(), explained))
            if found.class_averages is not None:
                classes_tried.append(explained)
            if passed and found.class_averages is not None and explained < DOUBTFUL_EXPLAINED_FROM_CLASSES:
                # Doubtful: the attempt that explains most is kept, a blob's whose views came out
                # preferred included (on a top-view set the blob's map explained 0.86 and, after
                # the balanced rounds, posed the particles at 1.6 deg, where the doubtful search
                # from class averages kept over it explained 0.78 and ended at 5.8 deg;
                # docs/realistic-data.md, section 16), and another seed is tried while retries
                # are left.
                if best is None or explained > best[1]:
                    best = (found, explained, attempt + 1)
                if attempt == cfg.search_retries:
                    break
                self._log(f"search: the map from class averages explains {explained:.0%} of the signal the "
                          f"images carry (converged ones explained {_CONVERGED_EXPLAINED}): doubtful; "
                          f"searching again from another seed")
                continue
            if passed and start is None and cfg.search_start == "auto" and scf < SCF_WARNING \
                    and attempt < cfg.search_retries:
                # A blob's map is made mostly of the common views, and the rare ones are posed
                # against it wrong (on simulated top-view sets 100-140 deg off, where a start from
                # class averages, which weigh each view alike, poses them within 5 deg).
                self._log(f"search: the subset's views came out preferred (SCF* {scf:.2f} < {SCF_WARNING}), "
                          "and a search from a blob poses the rare views wrong: searching again from 2D "
                          "class averages")
                best, start = (found, explained, attempt + 1), "classes"  # kept if those fail or doubt
                continue
            if passed:
                best = (found, explained, attempt + 1)
                break
            if best is None or explained > best[1]:
                best = (found, explained, attempt + 1)
            again = "searching again from another seed"
            if start is None and cfg.search_start == "auto":
                start, again = "classes", "searching again from 2D class averages"
            self._log(f"search: the map explains {explained:.0%} of the signal the images carry (a right "
                      f"one about 100%): a wrong start; "
                      + (again if attempt < cfg.search_retries else "no retries left"))
        found, explained, kept_attempt = best
        self.search_explained = explained
        if found.class_averages is None and classes_tried:
            self._log(f"search: the searches from class averages explain at most {max(classes_tried):.0%} "
                      f"of the signal (doubtful below {DOUBTFUL_EXPLAINED_FROM_CLASSES:.0%}): the blob's, "
                      f"which explains {explained:.0%}, is kept")
        if found.class_averages is not None:
            ca = found.class_averages
            self.run_dir.write_class_averages(ca.images.cpu().numpy() * self.box, ca.sizes.cpu().numpy(),
                                              self.pixel_size_a)
        if cfg.initial_map:
            started, low = "from a given map ", LOW_SIGNAL_ENERGY_WITH_START
        elif found.class_averages is not None:
            started, low = "from class averages ", LOW_SIGNAL_ENERGY_FROM_CLASSES
        else:
            started, low = "", LOW_SIGNAL_ENERGY
        if explained >= cfg.min_explained and info < low:
            # (at this little signal, the best pose of each image fits noise too: the share
            # explained is not a measure any more)
            self._warn(f"{self.table.source_path or 'the particles'}: the images carry little signal "
                       f"each (whitened signal energy {info:.0f} per image within 10 px, below the "
                       f"{low:.0f} under which the search {started}has failed on every set it was "
                       f"measured on): the map and poses are likely wrong")
        if explained < cfg.min_explained:
            self._warn(f"{self.table.source_path or 'the particles'}: the ab initio search failed "
                       f"{len(attempts)} time(s): its best map explains only {explained:.0%} of the "
                       f"signal the images carry (a right one about 100%), so the map and poses are "
                       f"likely wrong. Either the images carry too little signal each (whitened signal "
                       f"energy {info:.0f} per image within 10 px; the search has converged on every "
                       f"set with 274 or more, whatever its size, and failed on every one with 93 or "
                       f"less), or junk or preferred views mislead it")
        agreement = None
        doubtful = cfg.min_explained <= explained < DOUBTFUL_EXPLAINED_FROM_CLASSES
        if found.class_averages is not None and doubtful:
            agreement = self._doubtful_search(found, explained, tried)
        self.run_dir.log({"stage": "search_done", "attempts": len(attempts), "kept_attempt": kept_attempt,
                          "explained_signal": explained,
                          "attempts_agreement": agreement, "seconds": time.perf_counter() - t_all})
        return found

    def _doubtful_search(self, found, explained: float, tried: list) -> float | None:
        """Warn that the kept search from class averages is doubtful (it explains less than
        :data:`DOUBTFUL_EXPLAINED_FROM_CLASSES`), saying how far the other attempts' poses agree
        with its own (:func:`cryoai.evaluation.metrics.pose_agreement` over the particles both
        searched); returns that share (None: one attempt).
        """
        agreement = None
        rot = found.rotations.detach().double().cpu()
        for subset, rotations, _ in tried:
            if subset is found.subset or (rotations.shape == rot.shape and torch.equal(rotations, rot)):
                continue  # the kept attempt's own
            common, mine, theirs = np.intersect1d(found.subset, subset, return_indices=True)
            if len(common) < 10:
                continue
            share = pose_agreement(rot[mine].numpy(), rotations[theirs].numpy(), seed=self.cfg.seed)
            agreement = share if agreement is None else max(agreement, share)
        said = f"the search from 2D class averages is doubtful: the best of {len(tried)} attempt(s) " \
               f"explains {explained:.0%} of the signal the images carry (converged searches from class " \
               f"averages explained {_CONVERGED_EXPLAINED} on the sets measured, failed ones " \
               f"{_FAILED_EXPLAINED})"
        if agreement is None:
            said += ": the map and poses may be wrong"
        elif agreement < AGREEING_SHARE:
            said += (f", and the attempts pose only {agreement:.0%} of the particles alike (two that found "
                     f"the same map pose most alike): the map and poses are likely wrong")
        else:
            said += (f", but two attempts pose {agreement:.0%} of the particles alike: the map may be "
                     f"right; check it")
        self._warn(f"{self.table.source_path or 'the particles'}: {said}")
        return agreement

    def balance_preferred_views(self, found):
        """Stage 1a': where the subset's views are preferred (SCF* below :data:`SCF_WARNING`),
        its poses refined against half maps that weigh every direction of views alike
        (:func:`cryoai.reconstruction.view_balance.refine_balanced`), and the balanced map is
        the one the other particles are posed against. Unchanged otherwise, or with
        ``--no-balance-views``.
        """
        cfg = self.cfg
        scf = sampling_compensation_factor(found.rotations.double().cpu().numpy())
        if not cfg.balance_views or not scf < SCF_WARNING or len(found.spectra) < 20:
            return found
        self._log(f"views: the subset's views are preferred (SCF* {scf:.2f} < {SCF_WARNING}): refining its "
                  "poses against maps that weigh every view alike")
        out = refine_balanced(self.model.formation, found.spectra, found.ctf, found.rotations,
                              found.shifts_px, assignment_settings(cfg, self.box),
                              mask_radius_px=map_mask_radius_px(self.box, cfg.mask_radius_frac),
                              seed=cfg.seed, log=self._log)
        self.state.minutes += out.seconds / 60
        self.views_balanced = True
        scf_after = sampling_compensation_factor(out.rotations.double().cpu().numpy())
        self.run_dir.log({"stage": "balanced_views", "views_scf": scf, "views_scf_after": scf_after,
                          "rounds": len(out.median_change_deg), "median_change_deg": out.median_change_deg,
                          "effective_particles": out.effective_particles, "seconds": out.seconds,
                          "minutes": self.state.minutes})
        self._log(f"views: {len(out.median_change_deg)} balanced rounds in {out.seconds:.0f} s (the weights "
                  f"are worth {out.effective_particles:.0f} of {len(out.weights)} particles); SCF* now "
                  f"{scf_after:.2f}")
        return replace(found, rotations=out.rotations.to(found.rotations.dtype),
                       shifts_px=out.shifts_px.to(found.shifts_px.dtype),
                       fourier_volume=out.reconstruction.fourier_volume)

    def _explained(self, found, radius_px: float) -> float:
        """The share of the subset images' signal within ``radius_px`` that the search's map
        explains at their poses (NaN without a noise model).
        """
        if self.dataset.noise is None:
            return float("nan")
        score, _, _, _ = score_spectra(self.model.formation, found.fourier_volume, found.spectra, found.ctf,
                                    found.rotations, found.shifts_px, radius_px)
        return explained_signal(score.cpu().numpy(), self.dataset.noise.information(radius_px))

    def _warn(self, message: str) -> None:
        """A warning: said on stderr (by rank 0) and kept for outputs.json."""
        self.warnings.append(message)
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr)

    def _say_search_plan(self, settings: SearchSettings, start) -> None:
        """The search's budget and schedule, and which of it follows the data: said, and logged
        as the ``search_plan`` stage.

        What follows the data: the subset (every particle up to ``search_subset``: past it the
        search's cost does not grow with the data set), the start and so the band schedule (a
        blob's EM widens its band from ``search_radius_start`` to ``search_radius_end``; a start
        from class averages or a given map runs at the final band from the start), and the first
        guesses' band (:func:`first_guess_band`). The EM's batch and iterations are fixed: a
        batch twice as large, where the images carry little signal each, turned none of three
        failed searches (two membrane sets) into a passing one and cost half as long again
        (docs/realistic-data.md, section 15).
        """
        n = len(self.table)
        subset = min(settings.subset, n)
        batch = min(settings.batch, subset)
        kind = ("a blob" if start is None else "2D class averages" if isinstance(start, str)
                else "the given map")
        band = (f"{settings.radius_start_px:g} -> {settings.radius_end_px:g} px" if start is None
                else f"{settings.radius_end_px:g} px from the start")
        first_px = settings.radius_end_px if self.cfg.assign_radius_px is None else self.cfg.assign_radius_px
        plan = {"stage": "search_plan", "particles": n, "subset": subset, "subset_cap": settings.subset,
                "batch": batch, "iterations": settings.iterations, "start": kind,
                "band_start_px": settings.radius_end_px if start is not None else settings.radius_start_px,
                "band_end_px": settings.radius_end_px, "first_guess_band_px": float(first_px),
                "retries": self.cfg.search_retries}
        self._log(f"search plan: {subset} of {n} particles ("
                  + ("all" if subset == n else f"at most {settings.subset}: the search's cost does not "
                     "grow with the data set")
                  + f"), from {kind}, EM band {band}, batches of {batch} images for at most "
                  f"{settings.iterations} iterations (at most {settings.iterations * batch / subset:.0f} "
                  f"visits per image), first guesses within {first_px:g} px, up to "
                  f"{self.cfg.search_retries} more attempt(s) if the map explains too little")
        self.run_dir.log(plan)

    def _search_start(self, info: float) -> str | None:
        """``--search-start`` without ``--initial-map``: ``"classes"`` or None (a blob), said."""
        choice = self.cfg.search_start
        if choice == "auto":
            choice = "classes" if info < CLASS_START_ENERGY else "blob"
            if info != info:  # NaN: no noise measured (noise-free images, or --noise-model white)
                self._log("search: the images' signal energy is unknown (no noise measured): "
                          "starting from a blob")
            else:
                self._log(f"search: whitened signal energy {info:.0f} per image within 10 px: starting "
                          + ("from 2D class averages (below " if choice == "classes" else
                             "from a blob (at or above ") + f"{CLASS_START_ENERGY:.0f})")
        self.run_dir.log({"stage": "search_start", "start": choice, "signal_energy": info})
        return "classes" if choice == "classes" else None

    def _starting_map(self) -> torch.Tensor | None:
        """``--initial-map`` as the search's start (low-passed), or None (a blob)."""
        cfg = self.cfg
        if not cfg.initial_map:
            return None
        volume = read_initial_map(cfg.initial_map, self.box, self.pixel_size_a)
        self._log(f"search: starting from {cfg.initial_map} low-passed to "
                  f"{cfg.initial_map_resolution_a:g} A, the EM at its final band from the start")
        return starting_map(torch.as_tensor(volume, dtype=torch.float32, device=self.device),
                            self.pixel_size_a, cfg.initial_map_resolution_a)

    def _handle_inverted_contrast(self, found):
        """Data of the other contrast sign (protein dark) make the search's map negative: say so,
        and go on with the images inverted. The search's poses stay right (the error of the
        negated images against the negated map is the same), so only the signs change: the
        map's, the subset's spectra's and the data set's (``invert_contrast`` in config.yaml and
        the checkpoint, so that predict-poses reads the data the same way).
        """
        mask_px = map_mask_radius_px(self.box, self.cfg.mask_radius_frac)
        skewness = density_skewness(ifft3_c(found.fourier_volume).real, mask_px)
        if skewness >= INVERTED_SKEWNESS:
            return found
        self.cfg.invert_contrast = not self.cfg.invert_contrast
        self.dataset.sign = -self.dataset.sign
        flag = "with" if self.cfg.invert_contrast else "without"
        self._warn(f"{self.table.source_path or 'the particles'}: the images' contrast looks "
                   f"inverted (protein dark: the search's map has density skewness "
                   f"{skewness:.2f}); the run goes on as {flag} --invert-contrast")
        self.run_dir.write_config(self.cfg)
        return replace(found, fourier_volume=-found.fourier_volume, spectra=-found.spectra)

    def learn_pose_encoder(self, fourier_volume: torch.Tensor, spectra: torch.Tensor, ctf: torch.Tensor,
                           rotations: torch.Tensor, shifts_px: torch.Tensor) -> bool:
        """Stage 1b: the pose encoder learns from a map and the poses of some particles (all but
        a held-out part), then is checked against those poses on the held-out part.

        Returns
        -------
        Whether the assignment uses the encoder (``--pose-encoder``, and its check).
        """
        cfg = self.cfg
        minutes = cfg.encoder_minutes
        if cfg.max_minutes is not None:
            minutes = min(minutes, cfg.max_minutes - self.state.minutes)
            if minutes <= 0 and cfg.pose_encoder != "off":
                self._log("encoder: time limit (--max-minutes) reached: no pose encoder is trained")
        if cfg.pose_encoder == "off" or minutes <= 0 or len(spectra) < 20 or not self.is_main:
            return False  # (under torchrun, rank 0 trains it; the poses are broadcast from rank 0)
        t0 = time.perf_counter()
        settings = EncoderSettings(minutes=minutes, seed=cfg.seed)
        n = len(spectra)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 99)).to(spectra.device)
        n_check = min(settings.held_out, max(n // 10, 1))
        check_rows, train_rows = order[:n_check], order[n_check:]
        torch.manual_seed(cfg.seed + 5)  # the encoder's initial weights
        band_px = cfg.refine_radius_frac * max_paired_radius_px(self.box)  # the search map's band
        encoder = PoseGridEncoder(band_px=band_px).to(self.device)
        self._log(f"encoder: learning poses from the map for at most {minutes:.3g} min "
                  f"({len(train_rows)} real particles with their poses, simulated ones)")
        fit = train_pose_encoder(encoder, self.model.formation, fourier_volume, spectra[train_rows],
                                 ctf[train_rows], rotations[train_rows], shifts_px[train_rows], settings,
                                 log=self._log)
        check = check_pose_encoder(encoder, self.model.formation, fourier_volume, spectra[check_rows],
                                   ctf[check_rows], rotations[check_rows],
                                   assignment_settings(cfg, self.box), settings)
        use = cfg.pose_encoder == "always" or check.passed
        self.pose_encoder = encoder
        self.encoder_check = {**check.to_dict(), "used": use}
        self._log(f"encoder check on {check.particles} held-out particles: {cfg.encoder_hypotheses} "
                  f"hypotheses hold a rotation within {settings.agreement_deg:g} deg of the search's pose "
                  f"for {check.hypothesis_hit_rate:.0%}; posed within it: {check.amortized_agreement:.0%} "
                  f"amortized ({check.amortized_images_per_s:.0f} img/s), {check.global_agreement:.0%} by "
                  f"the global search ({check.global_images_per_s:.0f} img/s); with the global search for "
                  f"the {1 - check.amortized_fraction:.0%} the encoder is least sure of: "
                  f"{check.combined_agreement:.0%} ({check.combined_images_per_s:.0f} img/s)")
        if not use:
            if check.amortized_fraction < MIN_AMORTIZED_FRACTION:
                why = (f"only {check.amortized_fraction:.0%} of the particles could skip the global search "
                       f"as accurately (at least {MIN_AMORTIZED_FRACTION:.0%} needed; --encoder-minutes "
                       "trains it longer)")
            else:
                why = (f"with it, {check.combined_images_per_s:.0f} img/s; the global search alone poses "
                       f"{check.global_images_per_s:.0f} img/s here, and the encoder must be "
                       f"{MIN_SPEEDUP:g}x faster to be worth its errors")
            self._log(f"encoder: not used ({why}): the other particles get the global search; it is saved, "
                      "and predict-poses --first-guess encoder uses it")
        seconds = time.perf_counter() - t0
        self.state.minutes += seconds / 60
        self.run_dir.log({"stage": "encoder", "seconds": seconds, "minutes": self.state.minutes, **fit,
                          **{f"check_{k}": v for k, v in self.encoder_check.items()}})
        return use

    def learn_pose_encoder_from_given_poses(self, fourier_volume: torch.Tensor) -> None:
        """Stage 2b (``--poses``): the encoder stage on the reconstruction and the given poses of
        up to ``search_subset`` particles, so that ``predict-poses`` can use it.
        """
        if self.cfg.pose_encoder == "off" or not self.is_main:
            return
        rng = np.random.default_rng(self.cfg.seed)
        n = len(self.table)
        rows = np.sort(rng.choice(n, size=min(self.cfg.search_subset, n), replace=False))
        spectra, ctf = self._spectra().read(rows)
        poses = self.poses.select(rows)
        self.learn_pose_encoder(fourier_volume, spectra, ctf, poses.rotations.to(self.device),
                                (poses.shifts_a / self.pixel_size_a).to(self.device))

    def assign_remaining(self, found, use_encoder: bool) -> Poses:
        """Stage 1c: every particle outside the subset posed against the subset's map (amortized
        or global), then the map centred; returns the poses of every particle.
        """
        t0 = time.perf_counter()
        assigner = PoseAssigner(self.model.formation, found.fourier_volume,
                                assignment_settings(self.cfg, self.box),
                                self.pose_encoder if use_encoder else None,
                                min_confidence=encoder_min_confidence(self.encoder_check, self.cfg))
        n_rest = len(self.table) - len(found.subset)
        poses = assign_remaining(self._spectra(), found, assigner, log=self._log)
        seconds = time.perf_counter() - t0
        self.state.minutes += seconds / 60
        if self.dist.enabled:
            broadcast_(poses.rotations, self.dist)
            broadcast_(poses.shifts_a, self.dist)
        self.run_dir.log({"stage": "assignment", "mode": assigner.mode, "particles": n_rest,
                          "amortized": assigner.counts["amortized"], "global": assigner.counts["global"],
                          "seconds": seconds,
                          "images_per_s": n_rest / seconds if n_rest and seconds > 0 else None,
                          "minutes": self.state.minutes})
        return poses

    @torch.no_grad()
    def start_decoder_from_reconstruction(self):
        """Stage 2: the half-map FSC-regularised (Wiener/MAP) reconstruction at the poses starts
        the decoder, and its half maps are written. The voxel decoder is set to it and keeps its
        regulariser as a prior in the loss; FourierNet is fitted to it by regression.
        """
        t0 = time.perf_counter()
        # The half sets' sums are kept for the junk stage, which updates them as poses change.
        sums = half_set_sums(self._spectra(), self.poses, seed=self.cfg.seed)
        rec = reconstruction_from_sums(sums, mask_radius_px=map_mask_radius_px(self.box,
                                                                                self.cfg.mask_radius_frac))
        if self.mode == "search" and self.cfg.sort_junk and self.dataset.noise is not None:
            # (the scores are in units of the measured noise: none without a noise model)
            rec = self.sort_junk(rec, sums)
        del sums
        decoder = self.model.decoder
        fit_error = None
        if self.cfg.decoder == "voxel":
            fvol = rec.fourier_volume
            decoder.grid.data.copy_(torch.stack([fvol.real, fvol.imag]) / decoder.scale)
            self.prior_lam = rec.regulariser.float()
        else:
            fit_error = fit_decoder_to_fourier_volume(decoder, rec.fourier_volume,
                                                      steps=self.cfg.wiener_fit_steps,
                                                      seed=self.cfg.seed, log=self._log)
        seconds = time.perf_counter() - t0
        self.state.minutes += seconds / 60
        res = resolution_px(rec.fsc_halves, 0.143)
        mask_px = map_mask_radius_px(self.box, self.cfg.mask_radius_frac)
        skewness = density_skewness(ifft3_c(rec.fourier_volume).real, mask_px)
        if skewness < INVERTED_SKEWNESS:
            # Never hand over a negative map without saying so (here and in outputs.json).
            flag = "without" if self.cfg.invert_contrast else "with"
            self._warn(f"the reconstructed map is mostly negative (density skewness "
                       f"{skewness:.2f}): the images' contrast looks inverted (protein "
                       f"dark); run again {flag} --invert-contrast")
        self.run_dir.write_half_maps([(h * self.box).cpu().numpy().astype(np.float32) for h in rec.half_maps],
                                     self.pixel_size_a)
        self.run_dir.log({"stage": "reconstruction", "half_map_fsc_0.143_px": res,
                          "half_map_fsc_0.143_a": res * self.pixel_size_a,
                          "decoder_fit_relative_error": fit_error, "map_density_skewness": skewness,
                          "contrast_inverted": skewness < INVERTED_SKEWNESS, "seconds": seconds})
        return rec

    def sort_junk(self, rec, sums=None):
        """Stage 2a (default mode): every particle scored against the map at its pose, the junk
        called, and the particles called junk posed again against the kept particles' map
        (:mod:`cryoai.reconstruction.junk_sorting`); returns the kept particles' reconstruction
        (the given one if none is junk). The poses of the particles posed better change.
        """
        sorting = sort_junk(self._spectra(), self.poses, rec, groups=self.table.micrograph_ids,
                            assign_settings=assignment_settings(self.cfg, self.box),
                            mask_radius_px=map_mask_radius_px(self.box, self.cfg.mask_radius_frac),
                            settings=JunkSortSettings(threshold=self.cfg.junk_threshold,
                                                      passes=self.cfg.junk_passes,
                                                      max_shift_frac=self.cfg.junk_max_shift_frac),
                            seed=self.cfg.seed, sums=sums, log=self._log)
        if self.dist.enabled:
            broadcast_(sorting.poses.rotations, self.dist)
            broadcast_(sorting.poses.shifts_a, self.dist)
        self.poses = sorting.poses
        self.scores, decision = sorting.scores, sorting.decision
        self.kept, self.junk_distance = decision.keep, decision.distance
        n_junk = int((~decision.keep).sum())
        self._log(f"junk: {n_junk} of {len(self.table)} particles ({decision.junk_fraction:.0%}) lie farther "
                  f"than {decision.threshold:g} sd from the particles' cluster (amplitude, unexplained "
                  f"power; band {sorting.radius_px:.1f} px); {sorting.reposed} took a better pose on a "
                  f"second look; the map is made from the other {int(decision.keep.sum())}")
        self.run_dir.log({"stage": "junk", "junk": n_junk, "kept": int(decision.keep.sum()),
                          "junk_fraction": decision.junk_fraction, "band_px": sorting.radius_px,
                          "reposed": sorting.reposed, "passes": self.cfg.junk_passes,
                          "score_median_kept": float(np.median(self.scores.score[self.kept])),
                          "seconds": sorting.seconds})
        return sorting.reconstruction

    def classify_3d(self, rec) -> None:
        """Stage 2c (``--classes K``): K maps and each particle's class at the run's poses
        (:mod:`cryoai.reconstruction.classes3d`), junk included, so that it gathers in classes of
        its own; the maps are written as ``class_001.mrc`` ... (largest class first). The run's
        map stays that of the particles kept by the junk stage.
        """
        n = len(self.table)
        band_px = score_band_px(rec)
        scores = self.scores if self.scores is not None else \
            score_particles(self._spectra(), rec.fourier_volume, self.poses, band_px)
        trusted = self.kept if self.kept is not None else np.ones(n, bool)
        amplitude = micrograph_amplitude(scores.amplitude, self.table.micrograph_ids, trusted)
        result = classify_3d(self._spectra(), self.poses, np.arange(n), amplitude=amplitude,
                             radius_px=band_px,
                             mask_radius_px=map_mask_radius_px(self.box, self.cfg.mask_radius_frac),
                             settings=Classes3DSettings(n_classes=self.cfg.classes, seed=self.cfg.seed),
                             log=self._log)
        order = np.argsort(-result.sizes, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.classes = rank[result.assignment]
        self.class_probability = result.probability
        junk = ~trusted
        self.class_info = []
        volumes = []
        for i, k in enumerate(order):
            members = self.classes == i
            res_px = float(result.resolution_px[k])
            self.class_info.append({"class": i + 1, "particles": int(members.sum()),
                                    "junk_called": int(junk[members].sum()),
                                    "resolution_px": res_px, "resolution_a": res_px * self.pixel_size_a,
                                    "map": f"class_{i + 1:03d}.mrc"})
            volumes.append((ifft3_c(result.reconstructions[k].fourier_volume).real * self.box).cpu().numpy())
        self.run_dir.write_class_maps(volumes, self.pixel_size_a)
        self._log("3D classes: " + "; ".join(
            f"{c['class']}: {c['particles']} particles ({c['junk_called']} called junk), "
            f"{c['resolution_a']:.1f} A" for c in self.class_info))
        self.run_dir.log({"stage": "classes", "classes": self.class_info, "iterations": result.iterations,
                          "seconds": result.seconds})

    def _kept_count(self) -> int:
        """How many particles the reconstruction used (per step: no pass over the set)."""
        if self.kept is None:
            return len(self.table)
        if getattr(self, "_kept_count_of", None) is not self.kept:
            self._kept_count_of, self._kept_count_value = self.kept, int(self.kept.sum())
        return self._kept_count_value

    def _kept_rows(self) -> np.ndarray:
        """The particles not called junk (all when the junk stage did not run)."""
        return np.arange(len(self.table)) if self.kept is None else np.flatnonzero(self.kept)

    def _held_out_rows(self) -> np.ndarray | None:
        """With fixed poses and ``keep_best`` (and noisy images): the kept particles held out
        of the decoder's training to judge its states (:meth:`held_out_loss`), 5% of them (50 to
        512), drawn from the seed; else None.
        """
        rows = self._kept_rows()
        # (noise-free images: no noise to overfit, and every image helps)
        if not self.cfg.keep_best or self.poses is None or len(rows) < 200 or self.noise_free:
            return None
        n_held = min(512, max(len(rows) // 20, 50))
        pick = np.random.default_rng(self.cfg.seed + 777).choice(len(rows), size=n_held, replace=False)
        return np.sort(rows[pick])

    def check_views(self) -> float:
        """The SCF* of the kept particles' views (Baldwin & Lyumkis 2020), logged, and a
        warning below :data:`SCF_WARNING`: directions of Fourier space the views leave
        undersampled, so the map is smeared along them.
        """
        rows = self._kept_rows()
        scf = sampling_compensation_factor(self.poses.rotations[rows].double().numpy())
        self.run_dir.log({"stage": "views", "views_scf": scf, "particles": len(rows)})
        if scf < SCF_WARNING:
            # On simulated top-view sets a search from a blob posed the rare views wrong and its
            # map was distorted (docs/realistic-data.md, sections 10 and 11).
            search = ""
            if self.mode == "search":
                search = ("; the search's poses were refined against maps that weigh every view alike, "
                          "but a search from such views can still pose the rare views wrong: check the map"
                          if self.views_balanced else
                          "; a search from such views can also pose the rare views wrong (its map lacks "
                          "them): check the map")
            self._warn(f"{self.table.source_path or 'the particles'}: the views are preferred (SCF* "
                       f"{scf:.2f} < {SCF_WARNING}): the map's resolution is anisotropic, smeared along "
                       f"the undersampled directions{search} (cryoai report shows the view distribution)")
        return scf

    def _training_set(self):
        """The particles the decoder trains on: those not called junk nor held out."""
        rows = self._kept_rows()
        held = self._held_out_rows()
        if held is not None:
            rows = np.setdiff1d(rows, held)
        if len(rows) == len(self.table):
            return self.dataset
        return ParticleSubset(self.dataset, rows)

    @torch.no_grad()
    def held_out_loss(self, rows: np.ndarray, batch_size: int = 128) -> float:
        """The mean data term (no prior) of the particles ``rows`` at their fixed poses: how
        well the decoder's map predicts images it was not trained on.
        """
        self.model.eval()
        total = 0.0
        for start in range(0, len(rows), batch_size):
            batch = self.dataset.read(rows[start:start + batch_size]).to(self.device)
            total += float(self._fixed_pose_terms(batch).sum())
        self.model.train()
        return total / len(rows) / float(self.box) ** 2

    def _particle_columns(self) -> dict[str, np.ndarray] | None:
        """poses.star's per-particle columns of the junk stage (``rlnCryoaiJunk`` 1 for junk, the
        scores of :mod:`cryoai.reconstruction.particle_scores`) and of the 3D classes:
        ``rlnClassNumber`` is each particle's class (``--classes K``), or else 1 for the particles
        kept and 2 for junk.
        """
        classes = {} if self.classes is None else {
            "rlnClassNumber": self.classes + 1,
            "rlnCryoaiClassProbability": np.round(self.class_probability, 4)}
        if self.kept is None:
            return classes or None
        if self.classes is None:
            classes = {"rlnClassNumber": np.where(self.kept, 1, 2)}
        return {**classes, "rlnCryoaiJunk": (~self.kept).astype(np.int64),
                "rlnCryoaiScore": np.round(self.scores.score, 3),
                "rlnCryoaiAmplitude": np.round(self.scores.amplitude, 4),
                "rlnCryoaiResidualExcess": np.round(self.scores.residual_excess, 3),
                "rlnCryoaiJunkDistance": np.round(self.junk_distance, 3)}

    def fit(self, on_volume=None) -> None:
        """Stage 3: mini-batch gradient descent on the images, until the epochs or the minutes
        run out (or SIGINT); saves the state and re-raises on a diverged loss or a bad image.
        """
        from tqdm.auto import tqdm

        t_start, step_start = time.perf_counter(), self.state.step
        steps_per_epoch = max(1, math.ceil(len(self._training_set()) / self.cfg.batch_size))
        epochs = self.cfg.decoder_epochs if self.mode == "search" else self.cfg.max_epochs
        total_steps = int(math.ceil(epochs * steps_per_epoch))
        if self.mode == "search" and self.cfg.decoder_max_images:
            # The decoder's polish after the reconstruction of every particle: a budget flat in N.
            total_steps = min(total_steps, int(math.ceil(self.cfg.decoder_max_images / self.cfg.batch_size)))
        bar = tqdm(total=total_steps, initial=self.state.step, desc="train", unit="step",
                   disable=self.quiet, dynamic_ncols=True)
        with _StopOnSigint() as stop_flag:
            try:
                self._loop(total_steps, steps_per_epoch, bar, on_volume, stop_flag)
            except TrainingDiverged as exc:
                # Raised before the optimiser step: the parameters are still the last good ones.
                bar.close()
                self._save_state()
                raise TrainingDiverged(
                    f"{exc}; the last good state (step {self.state.step}) is saved in "
                    f"{self.run_dir.checkpoint_path} and volume.mrc (lower the learning rate, then "
                    "--resume)") from None
            except InputError as exc:
                # A bad image met mid-run (the start-up checks read only a sample): keep the work.
                bar.close()
                self._save_state()
                msg = str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc)
                msg = msg.split("InputError: ", 1)[-1]
                raise InputError(f"{msg}; the state at step {self.state.step} is saved in "
                                 f"{self.run_dir.checkpoint_path}") from None
        bar.close()
        if stop_flag.requested:
            # Interrupted (SIGINT): the step in flight was finished; save and stop.
            self._save_state()
            if not self.quiet:
                tqdm.write(f"interrupted at step {self.state.step}: checkpoint and map written to "
                           f"{self.outdir}; continue with --resume")
            raise KeyboardInterrupt
        self.run_dir.log({"stage": "fit", "steps": self.state.step - step_start,
                          "seconds": time.perf_counter() - t_start, "minutes": self.state.minutes})

    def write_outputs(self, on_volume=None) -> dict:
        """Stage 4: checkpoint, map, and the poses (searched or predicted by the encoder)."""
        self.checkpoint()
        vol_path = self.write_volume()
        if on_volume is not None and self.is_main:
            on_volume(self)
        self.run_dir.flush()
        outputs = {"volume": str(vol_path), "checkpoint": str(self.run_dir.checkpoint_path),
                   "steps": self.state.step, "minutes": self.state.minutes,
                   "images_seen": self.state.images_seen, "version": __version__}
        if self.mode != "given":
            outputs["poses"] = str(self.write_poses())
        if self.poses is not None and self.mode == "search":
            outputs["views_scf"] = self.check_views()
            if math.isfinite(self.search_explained):
                outputs["search_explained_signal"] = self.search_explained
            if self.kept is not None:
                outputs["junk"] = int((~self.kept).sum())
            if self.class_info:
                outputs["classes"] = self.class_info
        if self.warnings:
            outputs["warnings"] = list(self.warnings)
        return outputs

    # ------------------------------------------------------------ the fit loop
    def _loop(self, total_steps: int, steps_per_epoch: int, bar, on_volume,
              stop_flag: _StopOnSigint) -> None:
        t0 = time.perf_counter() - self.state.minutes * 60
        last_vol = last_ckpt = time.perf_counter()
        running = []  # (loss, images) since the last log record
        best = _BestState(self, total_steps)
        self._loop_steps(total_steps, steps_per_epoch, bar, on_volume, stop_flag, t0, last_vol,
                         last_ckpt, running, best)
        best.restore_if_better()

    def _loop_steps(self, total_steps, steps_per_epoch, bar, on_volume, stop_flag, t0, last_vol, last_ckpt,
                    running, best) -> None:
        cfg = self.cfg
        while self.state.step < total_steps:
            start = self.state.step - self.state.epoch * steps_per_epoch
            loader = make_loader(self._training_set(), cfg.batch_size, shuffle=True,
                                 seed=cfg.seed + self.state.epoch, num_workers=cfg.num_workers,
                                 start=start, rank=self.dist.rank, world_size=self.dist.world_size)
            for batch in loader:
                loss = self.train_step(batch)
                running.append((loss, len(batch)))
                self.state.step += 1
                self.state.images_seen += self.last_global_batch
                self.state.minutes = (time.perf_counter() - t0) / 60
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    mean_loss = self._log_loss(running)
                    running = []
                    bar.set_postfix(loss=f"{mean_loss:.4g}")
                now = time.perf_counter()
                if now - last_vol > cfg.volume_every_minutes * 60 and self.is_main:
                    self.write_volume()
                    if on_volume is not None:
                        on_volume(self)
                    last_vol = now
                if now - last_ckpt > cfg.checkpoint_every_minutes * 60:
                    self.checkpoint()
                    last_ckpt = now
                best.step()
                want_stop = (cfg.max_minutes is not None and self.state.minutes >= cfg.max_minutes) or \
                    stop_flag.requested
                # Every rank must stop at the same step.
                if any_true(want_stop, self.dist, self.device) or self.state.step >= total_steps:
                    return
            self.state.epoch += 1

    def _log_loss(self, running: list[tuple[float, int]]) -> float:
        weight = float(sum(b for _, b in running))
        mean_loss = float(sum(v * b for v, b in running)) / max(weight, 1.0)
        mean_loss = weighted_mean(mean_loss, weight, self.dist, self.device)
        self.run_dir.log({"step": self.state.step, "epoch": self.state.epoch, "loss": mean_loss,
                          "grad_norm": self.last_grad_norm, "minutes": self.state.minutes,
                          "images": self.state.images_seen})
        self.run_dir.scalar("loss/train", mean_loss, self.state.step)
        return mean_loss

    def _radius_keep(self) -> torch.Tensor | None:
        if self.cfg.max_radius_frac >= 1.0:
            return None
        return self.model.formation.band(self.cfg.max_radius_frac * max_paired_radius_px(self.box))

    def loss_on_batch(self, batch: ParticleBatch) -> torch.Tensor:
        """The training loss (mean over the batch, divided by N^2) of one batch on the device:
        :func:`cryoai.training.losses.pose_loss_terms` at the fixed poses (plus the MAP prior),
        or at the encoder's hypotheses (minimum over heads and, with the symmetric loss, paths).
        """
        if self.poses is not None:
            loss = self._fixed_pose_terms(batch).mean()
            if self.prior_lam is not None:
                # MAP prior (the Wiener regulariser), per particle of the reconstruction.
                v = self.model.decoder.fourier_volume()
                loss = loss + (self.prior_lam * v.abs() ** 2).sum() / self._kept_count()
        else:
            target, ctf, keep = self._targets(batch)
            rot, shifts = encoder_hypotheses(self.model, batch.images, self.mask,
                                             learn_shifts=self.cfg.learn_shifts)
            terms = pose_loss_terms(self.model.formation, self.model.decoder, target, ctf, rot, shifts,
                                    symmetric=self.cfg.loss == "symmetric", keep=keep)
            loss = terms.flatten(1).min(dim=-1).values.mean()
        return loss / float(self.box) ** 2

    def _targets(self, batch: ParticleBatch):
        """``(spectra, ctf, keep)`` of a batch on the device, within the loss's band ``keep``."""
        formation = self.model.formation
        keep = self._radius_keep()
        target = formation.spectra(batch.images)
        ctf = formation.ctf(batch)
        if keep is not None:
            target, ctf = target[:, keep], ctf[:, keep]
        return target, ctf, keep

    def _fixed_pose_terms(self, batch: ParticleBatch) -> torch.Tensor:
        """The data term (B,) of each image of a batch (on the device) at its fixed pose."""
        target, ctf, keep = self._targets(batch)
        idx = batch.index.cpu()
        rot = self.poses.rotations[idx].to(self.device)[:, None]
        shifts = self.poses.shifts_a[idx].to(self.device)[:, None]
        terms = pose_loss_terms(self.model.formation, self.model.decoder, target, ctf, rot, shifts,
                                symmetric=False, keep=keep)
        return terms.reshape(len(batch))

    def train_step(self, batch: ParticleBatch) -> float:
        """One optimiser step on ``batch`` (this rank's shard of the global batch); returns the
        batch's mean loss (this rank's). Raises :class:`TrainingDiverged` (on every rank) before
        touching the parameters if the loss or the gradient is not finite.
        """
        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        local_b = len(batch)
        self.last_global_batch = local_b
        if self.ddp is None:
            loss = self.loss_on_batch(batch)
            scaled = loss
            finite = bool(torch.isfinite(loss.detach()))
        else:
            loss = self.ddp(batch)
            # One all-reduce gives the global batch size and whether every rank's loss is
            # finite. DDP averages the ranks' gradients; weighting each rank's mean by its share
            # of the global batch makes that average the gradient of the global batch mean.
            sums = torch.tensor([float(local_b), float(torch.isfinite(loss.detach()))],
                                dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sums)
            global_b = float(sums[0])
            self.last_global_batch = int(global_b)
            finite = int(sums[1]) == self.dist.world_size
            scaled = loss * (local_b * self.dist.world_size / global_b)
        if not finite:
            raise TrainingDiverged(f"the loss became {loss.item()} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.last_grad_norm = float(norm)
        if not math.isfinite(self.last_grad_norm):
            raise TrainingDiverged(f"the gradient became {self.last_grad_norm} at step {self.state.step}")
        self.optimizer.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ outputs
    def volume(self) -> np.ndarray:
        """The decoder's map, (N, N, N) float32."""
        self.model.eval()
        return decoder_to_volume(self.model.decoder, self.box).cpu().numpy().astype(np.float32)

    def write_volume(self) -> Path:
        """Write the decoder's map to ``volume.mrc`` (rank 0); returns its path."""
        if not self.is_main:
            return self.run_dir.volume_path
        return self.run_dir.write_map(self.volume(), self.pixel_size_a, step=self.state.step)

    def checkpoint(self) -> None:
        """Save model, optimiser, state, options and searched poses to ``checkpoint.pt``."""
        if not self.is_main:
            return
        extra = {}
        if self.mode == "search" and self.poses is not None:
            extra = {"pose_rotations": self.poses.rotations, "pose_shifts_a": self.poses.shifts_a}
        if self.prior_lam is not None:
            extra["prior_lam"] = self.prior_lam.cpu()
        if self.kept is not None:
            extra["kept"] = torch.from_numpy(self.kept)
            extra["scores"] = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
                               for k, v in self.scores.__dict__.items()}
            extra["junk_distance"] = torch.from_numpy(self.junk_distance)
        if self.classes is not None:
            extra["classes"] = torch.from_numpy(self.classes)
            extra["class_probability"] = torch.from_numpy(self.class_probability)
            extra["class_info"] = self.class_info
        if self.pose_encoder is not None:
            extra["pose_encoder"] = {"settings": self.pose_encoder.settings,
                                     "state": {k: v.cpu() for k, v in self.pose_encoder.state_dict().items()},
                                     "check": self.encoder_check}
        self.run_dir.save_checkpoint({
            **extra,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__.copy(),
            "config": self.cfg.to_dict(),
            "box_px": self.box,
            "pixel_size_a": self.pixel_size_a,
            "scale": self.scale,
            "fixed_poses": self.model.encoder is None,  # no encoder to predict poses with
            "argv": list(map(str, self.argv)),
            "views_balanced": self.views_balanced,
        })
        self.last_checkpoint_step = self.state.step

    def _save_state(self) -> None:
        self.checkpoint()
        self.write_volume()

    def write_poses(self) -> Path:
        """``poses.star``: the searched poses, or the encoder's (streamed, batch by batch)."""
        if self.poses is not None:
            return self.run_dir.write_poses(self.table, self.poses, self._particle_columns())
        if not self.is_main:
            return self.run_dir.poses_path
        loader = make_loader(self.dataset, 128, shuffle=False, seed=0, num_workers=self.cfg.num_workers)
        predicted = iter_poses(self.model, loader, self.mask, self.device,
                               use_symmetric=self.cfg.loss == "symmetric", learn_shifts=self.cfg.learn_shifts)
        return self.run_dir.write_poses(self.table, ((rot, shifts) for rot, shifts, _ in predicted))

    # ------------------------------------------------------------------ helpers
    def _spectra(self) -> ParticleSpectra:
        return ParticleSpectra(self.dataset, self.model.formation, self.device)

    def _log(self, message: str) -> None:
        if not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(message)

    @torch.no_grad()
    def _sync_from_rank0(self) -> None:
        """Make every rank hold rank 0's parameters and prior (after an initialisation that each
        rank computed on its own).
        """
        if not self.dist.enabled:
            return
        for p in self.model.parameters():
            broadcast_(p.data, self.dist)
        if self.prior_lam is not None:
            broadcast_(self.prior_lam, self.dist)
