"""The gradient loop: mini-batch descent on the images, with checkpoints, resume, SIGINT and NaN
handling, and torch.distributed.

:class:`Trainer` fits the decoder at fixed poses (the default run's polish after its
reconstruction, ``--poses`` runs), or the encoder and the decoder together (the paper's amortized
training, ``--ab-initio encoder``). What comes before (the search, the reconstruction, the junk
calls) is the pipeline's (:func:`cryoai.pipeline.run_default`): the trainer gets its results as
values (the poses, the particles kept, the prior) and saves them, with ``checkpoint_extra``, in
every checkpoint. SIGINT finishes the step in flight and saves; a NaN loss or gradient stops
before the parameters are touched; ``--resume`` continues mid-epoch with the same batches.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..data.dataset import ParticleBatch, ParticleDataset, ParticleSubset
from ..data.loader import make_loader
from ..errors import CryoaiError, InputError
from ..models.cryoai import CryoAI, build_model, estimate_amplitude_profile
from ..models.decoders import decoder_to_volume
from ..models.image_formation import ImageFormation
from ..physics.grids import max_paired_radius_px
from ..physics.masks import circular_mask
from ..physics.poses import Poses
from ..physics.projection import gridding_corrected
from .config import TrainConfig
from .decoder_fit import fit_decoder_to_fourier_volume
from .distributed import DistInfo, any_true, broadcast_, data_parallel_loss, weighted_mean
from .losses import pose_loss_terms
from .poses import encoder_hypotheses, iter_poses
from .run_dir import RunDirectory


class TrainingDiverged(CryoaiError):
    """The loss became NaN or infinite."""


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


def new_model(cfg: TrainConfig, dataset: ParticleDataset, *, with_encoder: bool, device) -> CryoAI:
    """The run's model (the voxel decoder preconditioned by the data's radial amplitude)."""
    table = dataset.table
    box, pixel_size_a = table.box_px, table.median_pixel_size_a()
    profile = None
    if cfg.decoder == "voxel":
        sample = dataset.read(np.arange(min(len(table), 256)))
        profile = estimate_amplitude_profile(ImageFormation(box, pixel_size_a), sample)
    return build_model(
        cfg, box, pixel_size_a, with_encoder=with_encoder, amplitude_profile=profile, device=device
    ).to(device)


def new_optimizer(model: CryoAI, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the decoder (and the encoder), each at its learning rate."""
    groups = [
        {
            "params": list(model.decoder.parameters()),
            "name": "decoder",
            "lr": cfg.lr_voxel if cfg.decoder == "voxel" else cfg.lr_decoder,
        }
    ]
    if model.encoder is not None:
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.lr_encoder, "name": "encoder"})
    return torch.optim.Adam(groups, amsgrad=cfg.amsgrad)


@torch.no_grad()
def start_decoder(
    model: CryoAI, fourier_volume: torch.Tensor, regulariser: torch.Tensor, cfg: TrainConfig, log=print
) -> tuple[torch.Tensor | None, float | None]:
    """The decoder started from a regularised reconstruction: the voxel decoder is set to it and
    keeps its regulariser as a prior in the loss; FourierNet is fitted to it by regression.

    Returns
    -------
    The prior (voxel decoder; else None) and FourierNet's relative fit error (else None).
    """
    decoder = model.decoder
    if cfg.decoder == "voxel":
        decoder.grid.data.copy_(torch.stack([fourier_volume.real, fourier_volume.imag]) / decoder.scale)
        return regulariser.float(), None
    return None, fit_decoder_to_fourier_volume(
        decoder, fourier_volume, steps=cfg.wiener_fit_steps, seed=cfg.seed, log=log
    )


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


class Trainer:
    """The gradient loop of a run (see the module docstring).

    Parameters
    ----------
    model, optimizer : the run's (restored from the checkpoint on ``--resume``).
    dataset : the particles, read as the run reads them (sign, scale, whitening).
    cfg : the options.
    run_dir : where the map, logs and checkpoints go.
    device : torch device.
    state : where the run stands (its minutes so far included).
    poses : every particle's fixed pose; None: the encoder predicts them (amortized training).
    symmetry : (G, 3, 3) the map's point group (None: C1): with fixed poses, each image of a
        training batch is compared with the map at ``S R`` for an operator ``S`` drawn at random,
        so that the decoder fits the symmetric map (the loss over the group, in expectation).
    prior_lam : the voxel decoder's MAP prior (the reconstruction's regulariser), or None.
    kept : (n,) bool, the particles not called junk (None: all).
    polish : the default run's decoder polish: ``decoder_epochs`` (at most ``decoder_max_images``)
        instead of ``max_epochs``.
    noise_free : the images hold no noise (no particles are held out to judge the fit).
    checkpoint_extra : the stages' results saved in every checkpoint (poses, junk calls, ...).
    scale : the images' intensity scale (saved in checkpoints).
    dist_info : this process's rank under torchrun.
    quiet : no progress bar or log lines.
    argv : the command line, saved in checkpoints.
    say : where its lines go (e.g. the run's ``run.log`` and terminal); default the terminal.
    """

    def __init__(self, model: CryoAI, optimizer: torch.optim.Optimizer, dataset: ParticleDataset,
                 cfg: TrainConfig, run_dir: RunDirectory, *, device, state: TrainState,
                 poses: Poses | None = None, symmetry: torch.Tensor | None = None,
                 prior_lam: torch.Tensor | None = None,
                 kept: np.ndarray | None = None, polish: bool = False, noise_free: bool = False,
                 checkpoint_extra: dict | None = None, scale: float = 1.0,
                 dist_info: DistInfo | None = None, quiet: bool = False, argv: list[str] | None = None,
                 say=None):
        self.model, self.optimizer, self.dataset, self.cfg = model, optimizer, dataset, cfg
        self.run_dir, self.device, self.state = run_dir, device, state
        self.poses, self.prior_lam, self.kept, self.polish = poses, prior_lam, kept, polish
        self.symmetry = None if symmetry is None or len(symmetry) < 2 else symmetry.to(device, torch.float32)
        self.noise_free, self.checkpoint_extra, self.scale = noise_free, checkpoint_extra or {}, scale
        self.dist = dist_info or DistInfo()
        self.is_main = self.dist.is_main
        self.quiet = quiet or not self.is_main
        self.argv = argv or sys.argv
        self.say = say
        self.box = dataset.table.box_px
        self.pixel_size_a = dataset.table.median_pixel_size_a()
        self.n_kept = len(dataset.table) if kept is None else int(kept.sum())
        self.mask = None  # the encoder input's circular mask
        if cfg.mask_radius_frac > 0:
            self.mask = circular_mask(self.box, cfg.mask_radius_frac * self.box, soft_edge_px=3,
                                      device=device)
        self.last_grad_norm = float("nan")
        self.last_global_batch = 0
        self.ddp = None
        if self.dist.enabled:
            unused = model.encoder is not None and not cfg.learn_shifts  # the shift head
            self.ddp = data_parallel_loss(model, self.loss_on_batch, device, find_unused_parameters=unused)

    # ------------------------------------------------------------------ the fit
    def fit(self, on_volume=None) -> dict:
        """Mini-batch gradient descent on the images, until the epochs or the minutes run out
        (or SIGINT); saves the state and re-raises on a diverged loss or a bad image.

        ``on_volume(trainer)`` is called after each write of the map (e.g. to compute an FSC).
        Returns the fit's log record (steps, seconds, minutes).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._sync_from_rank0()
        t_start, step_start = time.perf_counter(), self.state.step
        steps_per_epoch = max(1, math.ceil(len(self._training_set()) / cfg.batch_size))
        total_steps = int(
            math.ceil((cfg.decoder_epochs if self.polish else cfg.max_epochs) * steps_per_epoch)
        )
        if self.polish and cfg.decoder_max_images:
            # The decoder's polish after the reconstruction of every particle: a budget flat in N.
            total_steps = min(total_steps, int(math.ceil(cfg.decoder_max_images / cfg.batch_size)))
        bar = tqdm(
            total=total_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=self.quiet,
            dynamic_ncols=True,
        )
        with _StopOnSigint() as stop_flag:
            try:
                best = _BestState(self, total_steps)
                self._loop(total_steps, steps_per_epoch, bar, on_volume, stop_flag, best)
                best.restore_if_better()
            except TrainingDiverged as exc:
                # Raised before the optimiser step: the parameters are still the last good ones.
                bar.close()
                self.save_state()
                raise TrainingDiverged(
                    f"{exc}; the last good state (step {self.state.step}) is saved in "
                    f"{self.run_dir.checkpoint_path} and volume.mrc (lower the learning "
                    "rate, then --resume)"
                ) from None
            except InputError as exc:
                # A bad image met mid-run (the start-up checks read only a sample): keep the work.
                bar.close()
                self.save_state()
                msg = str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc)
                msg = msg.split("InputError: ", 1)[-1]
                raise InputError(
                    f"{msg}; the state at step {self.state.step} is saved in {self.run_dir.checkpoint_path}"
                ) from None
        bar.close()
        if stop_flag.requested:
            # Interrupted (SIGINT): the step in flight was finished; save and stop.
            self.save_state()
            self._log(
                f"interrupted at step {self.state.step}: checkpoint and map written to "
                f"{self.run_dir.path}; continue with --resume"
            )
            raise KeyboardInterrupt
        figures = {"stage": "fit", "steps": self.state.step - step_start,
                   "seconds": time.perf_counter() - t_start, "minutes": self.state.minutes}
        self.run_dir.log(figures)
        return figures

    def _loop(self, total_steps, steps_per_epoch, bar, on_volume, stop_flag, best) -> None:
        cfg = self.cfg
        t0 = time.perf_counter() - self.state.minutes * 60
        last_vol = last_ckpt = time.perf_counter()
        running = []  # (loss, images) since the last log record
        while self.state.step < total_steps:
            start = self.state.step - self.state.epoch * steps_per_epoch
            loader = make_loader(
                self._training_set(),
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed + self.state.epoch,
                num_workers=cfg.num_workers,
                start=start,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
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
                want_stop = (
                    cfg.max_minutes is not None and self.state.minutes >= cfg.max_minutes
                ) or stop_flag.requested
                # Every rank must stop at the same step.
                if any_true(want_stop, self.dist, self.device) or self.state.step >= total_steps:
                    return
            self.state.epoch += 1

    def _log_loss(self, running: list[tuple[float, int]]) -> float:
        weight = float(sum(b for _, b in running))
        mean_loss = float(sum(v * b for v, b in running)) / max(weight, 1.0)
        mean_loss = weighted_mean(mean_loss, weight, self.dist, self.device)
        self.run_dir.log(
            {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "loss": mean_loss,
                "grad_norm": self.last_grad_norm,
                "minutes": self.state.minutes,
                "images": self.state.images_seen,
            }
        )
        self.run_dir.scalar("loss/train", mean_loss, self.state.step)
        return mean_loss

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
                loss = loss + (self.prior_lam * v.abs() ** 2).sum() / self.n_kept
        else:
            target, ctf, keep = self._targets(batch)
            rot, shifts = encoder_hypotheses(
                self.model, batch.images, self.mask, learn_shifts=self.cfg.learn_shifts
            )
            terms = pose_loss_terms(
                self.model.formation,
                self.model.decoder,
                target,
                ctf,
                rot,
                shifts,
                symmetric=self.cfg.loss == "symmetric",
                keep=keep,
            )
            loss = terms.flatten(1).min(dim=-1).values.mean()
        return loss / float(self.box) ** 2

    def _targets(self, batch: ParticleBatch):
        """``(spectra, ctf, keep)`` of a batch on the device, within the loss's band ``keep``."""
        formation = self.model.formation
        keep = None
        if self.cfg.max_radius_frac < 1.0:
            keep = formation.band(self.cfg.max_radius_frac * max_paired_radius_px(self.box))
        target = formation.spectra(batch.images)
        ctf = formation.ctf(batch)
        if keep is not None:
            target, ctf = target[:, keep], ctf[:, keep]
        return target, ctf, keep

    def _fixed_pose_terms(self, batch: ParticleBatch) -> torch.Tensor:
        """The data term (B,) of each image of a batch (on the device) at its fixed pose."""
        target, ctf, keep = self._targets(batch)
        idx = batch.index.cpu()
        rot = self.poses.rotations[idx].to(self.device)
        if self.symmetry is not None and self.model.training:  # an operator drawn per image
            pick = torch.randint(len(self.symmetry), (len(rot),)).to(self.device)
            rot = self.symmetry[pick] @ rot
        rot = rot[:, None]
        shifts = self.poses.shifts_a[idx].to(self.device)[:, None]
        terms = pose_loss_terms(
            self.model.formation, self.model.decoder, target, ctf, rot, shifts, symmetric=False, keep=keep
        )
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
            sums = torch.tensor(
                [float(local_b), float(torch.isfinite(loss.detach()))],
                dtype=torch.float64,
                device=self.device,
            )
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

    # ------------------------------------------------------------------ which particles
    def _kept_rows(self) -> np.ndarray:
        """The particles not called junk (all when the junk stage did not run)."""
        return np.arange(len(self.dataset.table)) if self.kept is None else np.flatnonzero(self.kept)

    def held_out_rows(self) -> np.ndarray | None:
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

    def _training_set(self):
        """The particles the decoder trains on: those not called junk nor held out."""
        rows = self._kept_rows()
        held = self.held_out_rows()
        if held is not None:
            rows = np.setdiff1d(rows, held)
        if len(rows) == len(self.dataset.table):
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
            batch = self.dataset.read(rows[start : start + batch_size]).to(self.device)
            total += float(self._fixed_pose_terms(batch).sum())
        self.model.train()
        return total / len(rows) / float(self.box) ** 2

    # ------------------------------------------------------------------ outputs
    def volume(self) -> np.ndarray:
        """The decoder's map in true amplitudes, (N, N, N) float32: the map it fitted through
        trilinear slices, times the interpolation's weight (:func:`gridding_corrected`).
        """
        self.model.eval()
        fitted = decoder_to_volume(self.model.decoder, self.box)
        return gridding_corrected(fitted, fitted=True).cpu().numpy().astype(np.float32)

    def write_volume(self):
        """Write the decoder's map to ``volume.mrc`` (rank 0); returns its path."""
        if not self.is_main:
            return self.run_dir.volume_path
        return self.run_dir.write_map(self.volume(), self.pixel_size_a, step=self.state.step)

    def checkpoint(self) -> None:
        """Save the model, optimiser, state, options and the stages' results to ``checkpoint.pt``."""
        if not self.is_main:
            return
        extra = dict(self.checkpoint_extra)
        if self.prior_lam is not None:
            extra["prior_lam"] = self.prior_lam.cpu()
        self.run_dir.save_checkpoint(
            checkpoint_payload(
                self.model,
                self.optimizer,
                self.state,
                self.cfg,
                scale=self.scale,
                argv=self.argv,
                extra=extra,
            )
        )

    def save_state(self) -> None:
        """The checkpoint and the map, now."""
        self.checkpoint()
        self.write_volume()

    def predicted_poses(self):
        """The encoder's poses of every particle, ``(rotations, shifts_a)`` blocks (amortized runs)."""
        loader = make_loader(self.dataset, 128, shuffle=False, seed=0, num_workers=self.cfg.num_workers)
        predicted = iter_poses(
            self.model,
            loader,
            self.mask,
            self.device,
            use_symmetric=self.cfg.loss == "symmetric",
            learn_shifts=self.cfg.learn_shifts,
        )
        return ((rot, shifts) for rot, shifts, _ in predicted)

    def _log(self, message: str) -> None:
        if self.say is not None:
            self.say(message)
        elif not self.quiet:
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


def checkpoint_payload(
    model: CryoAI,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: TrainConfig,
    *,
    scale: float,
    argv: list[str],
    extra: dict,
) -> dict:
    """A checkpoint's content: the model, optimiser, state and options, and ``extra`` (the
    stages' results).
    """
    return {
        **extra,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state.__dict__.copy(),
        "config": cfg.to_dict(),
        "box_px": model.box_px,
        "pixel_size_a": model.pixel_size_a,
        "scale": scale,
        "fixed_poses": model.encoder is None,  # no encoder to predict poses with
        "argv": list(map(str, argv)),
    }


class _BestState:
    """``keep_best``: the decoder's state (its regularised start included) that predicts the
    held-out particles best (:meth:`Trainer.held_out_loss`), judged at the start, about ten times
    during the fit and at its end; the run ends with it. With fixed poses the regularised
    reconstruction is the optimum of the same objective, and gradient steps on noisy
    mini-batches can only drift from it (on CFTR: 3.41 px after 2 epochs, 3.95 px after 24).
    """

    def __init__(self, trainer: Trainer, total_steps: int):
        self.trainer = trainer
        self.rows = trainer.held_out_rows()
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
        t._log(
            f"keep-best: the decoder's state at step {self.best_step} predicts the {len(self.rows)} held-out "
            f"particles best (loss {self.best_loss:.6g}); the run ends with it"
        )
        t.run_dir.log(
            {
                "stage": "keep_best",
                "best_step": self.best_step,
                "best_held_out_loss": self.best_loss,
                "steps": t.state.step,
            }
        )
