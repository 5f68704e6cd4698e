"""The training loop of ``cryoai train``: ab initio (encoder + decoder) or with fixed poses."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .. import __version__
from ..data.dataset import ParticleDataset, collate_batch, estimate_scale
from ..data.prefetch import ThreadPrefetcher
from ..errors import CryoaiError, InputError
from ..io.images import ImageSource
from ..io.mrc import write_volume
from ..io.particles import ParticleTable
from ..io.star import write_star
from ..models.cryoai import CryoAI, build_model, estimate_amplitude_profile
from ..models.decoders import decoder_to_volume
from ..physics.masks import circular_mask
from .checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import TrainConfig, save_yaml
from .distributed import DistInfo, any_true, broadcast_, weighted_mean
from .losses import squared_error, symmetric_loss_terms
from .poses import encoder_input, iter_poses, predict_poses


class TrainingDiverged(CryoaiError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    minutes: float = 0.0
    search_done: bool = False


class EpochBatches(Sampler):
    """The mini-batches of one epoch: a permutation of the particles drawn from ``seed``, cut
    into global batches of ``batch_size``, starting at batch ``start`` (to resume mid-epoch
    without reading the skipped images). With ``world_size`` > 1 each rank takes every
    ``world_size``-th particle of each global batch (its shard of that batch).

    Parameters
    ----------
    n : number of particles.
    batch_size : global batch size (all ranks together).
    seed : seed of the permutation (None: the particles in order).
    start : index of the first batch to yield.
    rank, world_size : this process's rank and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int | None, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)

    def __iter__(self):
        n_batches = math.ceil(self.n / self.batch_size)
        if self.seed is None:  # in order: nothing to hold
            for b in range(self.start, n_batches):
                stop = min((b + 1) * self.batch_size, self.n)
                yield list(range(b * self.batch_size + self.rank, stop, self.world_size))
            return
        # int32 (4 bytes per particle) gives the same permutation as the default int64
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed),
                               dtype=torch.int32)
        for b in range(self.start, n_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank::self.world_size].tolist()


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                start: int = 0, rank: int = 0, world_size: int = 1,
                prefetch: int = 2) -> DataLoader | ThreadPrefetcher:
    """A DataLoader over :class:`EpochBatches` that reads whole batches at once
    (``__getitems__``), reading ahead: with ``num_workers`` background processes (4 batches
    each), or, with ``num_workers=0``, in one background thread ``prefetch`` batches ahead
    (:class:`cryoai.data.prefetch.ThreadPrefetcher`; ``prefetch=0``: no read-ahead)."""
    sampler = EpochBatches(len(dataset), batch_size, seed=seed if shuffle else None, start=start,
                           rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=collate_batch,
                        num_workers=num_workers, persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    if num_workers == 0 and prefetch > 0:
        return ThreadPrefetcher(loader, depth=prefetch)
    return loader


class _LossModule(torch.nn.Module):
    """The training loss as a module, so that DistributedDataParallel can wrap it: its forward
    is :meth:`Trainer.loss_on_batch` and its parameters are the model's."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model = trainer.model
        self._loss = trainer.loss_on_batch

    def forward(self, batch: dict) -> torch.Tensor:
        if len(batch["index"]) == 0:
            # This rank's shard of a short last batch is empty: a zero loss that still touches
            # every parameter, so that the gradient all-reduce sees the same set on every rank.
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        return self._loss(batch)


class _StopOnSigint:
    """While active, the first SIGINT (Ctrl-C) only sets ``requested`` so that the training
    loop stops at the end of the step in flight; a second one interrupts at once. Does
    nothing outside the main thread."""

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


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of ``path`` (JSON lines) logged after ``step`` (work lost by a crash
    and about to be redone by ``--resume``)."""
    if not path.exists():
        return
    from ..io import write_text_atomic

    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if rec.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def check_fixed_poses(table: ParticleTable, fixed_poses: ParticleTable) -> None:
    """Raise :class:`InputError` unless ``fixed_poses`` holds poses for every particle of ``table``."""
    if len(fixed_poses) != len(table) or not fixed_poses.has_poses:
        raise InputError(f"{fixed_poses.source_path}: --poses must hold poses for the same "
                         f"{len(table)} particles (it has {len(fixed_poses)}"
                         f"{'' if fixed_poses.has_poses else ', without poses'})")


def check_inputs(table: ParticleTable, cfg: TrainConfig, fixed_poses: ParticleTable | None = None,
                 source: ImageSource | None = None) -> float:
    """Everything that can be checked before a run starts, so that a bad input fails before
    anything is written: the stacks (exist, MRC, mode, box, length), a sample of the images
    (NaN, infinite or blank images: the ``normalize_samples`` images of the intensity scale,
    and the first and last) and the fixed poses.

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
    source.read(np.unique([0, len(table) - 1]))
    scale = estimate_scale(table, cfg.normalize_samples, cfg.seed, source=source)
    if fixed_poses is not None:
        check_fixed_poses(table, fixed_poses)
    return scale


class Trainer:
    """Train a CryoAI model on a particle table and write the run's outputs to ``outdir``.

    Parameters
    ----------
    table : the particles.
    cfg : the training options.
    outdir : the run directory (config.yaml, checkpoint.pt, volume.mrc, poses.star, logs).
    device : torch device.
    fixed_poses : a table with the poses to hold fixed (reconstruction with known poses), or None.
    resume : continue from ``outdir/checkpoint.pt``.
    scale : the images' global intensity scale, if already estimated (:func:`check_inputs`).
    """

    def __init__(self, table: ParticleTable, cfg: TrainConfig, outdir: str | Path, *,
                 device: torch.device, fixed_poses: ParticleTable | None = None,
                 resume: bool = False, quiet: bool = False, argv: list[str] | None = None,
                 dist_info: DistInfo | None = None, scale: float | None = None):
        self.dist = dist_info or DistInfo()
        self.is_main = self.dist.is_main
        quiet = quiet or not self.is_main
        self.table = table
        self.cfg = cfg
        self.outdir = Path(outdir)
        self.device = device
        self.quiet = quiet
        self.argv = argv or sys.argv
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        self.box = table.box_px
        self.pixel_size_a = table.median_pixel_size_a()
        self.source = ImageSource(table)
        self.source.validate()

        self.fixed = fixed_poses is not None
        self.prior_lam: torch.Tensor | None = None
        # Ab initio by pose search: poses come from the search, then the decoder is trained
        # with them held fixed (as with --poses).
        self.search_mode = not self.fixed and cfg.ab_initio == "search"
        if self.fixed:
            check_fixed_poses(table, fixed_poses)
            self.fixed_rot = torch.as_tensor(fixed_poses.rotations, dtype=torch.float32)
            sh = fixed_poses.shifts_a if fixed_poses.has_shifts else np.zeros((len(table), 2))
            self.fixed_shift = torch.as_tensor(sh, dtype=torch.float32)

        ckpt = None
        if self.is_main:
            remove_stale_temporaries(self.outdir)
        if resume:
            ckpt_path = self.outdir / "checkpoint.pt"
            ckpt = load_checkpoint(ckpt_path, map_location=device)
            self.scale = float(ckpt["scale"])
        else:
            self.scale = scale if scale is not None else estimate_scale(
                table, cfg.normalize_samples, cfg.seed, source=self.source)
        self.dataset = ParticleDataset(table, invert_contrast=cfg.invert_contrast, scale=self.scale,
                                       source=self.source)
        profile = None
        if cfg.decoder == "voxel":
            probe = CryoAI(self.box, self.pixel_size_a, torch.nn.Identity())
            n_probe = min(len(table), 256)
            profile = estimate_amplitude_profile(probe, self.dataset.__getitems__(np.arange(n_probe)))
        self.model: CryoAI = build_model(cfg, self.box, self.pixel_size_a,
                                         with_encoder=not (self.fixed or self.search_mode),
                                         amplitude_profile=profile, device=device).to(device)
        self.mask = None
        if cfg.mask_radius_frac > 0:
            self.mask = circular_mask(self.box, cfg.mask_radius_frac * self.box, soft_edge_px=3,
                                      device=device)
        groups = []
        dec_lr = cfg.lr_voxel if cfg.decoder == "voxel" else cfg.lr_decoder
        groups.append({"params": list(self.model.decoder.parameters()), "lr": dec_lr, "name": "decoder"})
        if self.model.encoder is not None:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": cfg.lr_encoder,
                           "name": "encoder"})
        self.optimizer = torch.optim.Adam(groups, amsgrad=cfg.amsgrad)
        self.state = TrainState()
        if ckpt is not None:
            if "prior_lam" in ckpt:
                self.prior_lam = ckpt["prior_lam"].to(device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.state = TrainState(**ckpt["state"])
            if self.is_main:
                for log_name in ("train_log.jsonl", "fsc_log.jsonl"):
                    _truncate_log(self.outdir / log_name, self.state.step)
            if "pose_rotations" in ckpt:
                self.fixed_rot = ckpt["pose_rotations"].float().cpu()
                self.fixed_shift = ckpt["pose_shifts_a"].float().cpu()
                self.fixed = True
        self.history: list[dict] = []
        self.last_checkpoint_step = self.state.step
        self.last_grad_norm = float("nan")
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if device.type == "cuda":
                # Batch statistics over the global batch (SyncBatchNorm needs CUDA; on CPU each
                # rank normalises over its own shard, as plain DDP does).
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            unused = self.model.encoder is not None and not cfg.learn_shifts  # the shift head
            self.ddp = DistributedDataParallel(
                _LossModule(self), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused)
        self.writer = None
        if cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.outdir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.writer = None

    # ----------------------------------------------------------------- steps
    def _radius_keep(self) -> torch.Tensor | None:
        if self.cfg.max_radius_frac >= 1.0:
            return None
        return self.model.radius <= self.cfg.max_radius_frac * (self.box // 2 - 1)

    def loss_on_batch(self, batch: dict) -> torch.Tensor:
        """The training loss (mean over the batch) of one batch already on the device."""
        model = self.model
        keep = self._radius_keep()
        target = model.image_spectra(batch["images"])
        ctf = model.ctf(batch)
        weight = model.hermitian_weight
        if keep is not None:
            target, ctf, weight = target[:, keep], ctf[:, keep], weight[keep]
        norm = float(self.box) ** 2
        if self.fixed:
            idx = batch["index"].cpu()
            rot = self.fixed_rot[idx].to(self.device)
            shifts = self.fixed_shift[idx].to(self.device)
            pred = model.render(rot, shifts, None, keep)
            pred = pred * ctf
            loss = squared_error(target, pred, weight).mean()
            if self.prior_lam is not None:
                # MAP prior (the Wiener regulariser), per particle of the data set.
                v = model.decoder.fourier_volume()
                loss = loss + (self.prior_lam * v.abs() ** 2).sum() / len(self.dataset)
            return loss / norm
        rot, shifts = model.encoder(encoder_input(batch["images"], self.mask))
        if not self.cfg.learn_shifts:
            shifts = torch.zeros_like(shifts)
        b, h = rot.shape[:2]
        pred = model.render(rot.reshape(b * h, 3, 3), shifts.reshape(b * h, 2), None, keep)
        pred = pred * ctf.repeat_interleave(h, dim=0)
        tgt = target.repeat_interleave(h, dim=0)
        if self.cfg.loss == "symmetric":
            terms = symmetric_loss_terms(tgt, pred, weight).reshape(b, 2 * h)
        else:
            terms = squared_error(tgt, pred, weight).reshape(b, h)
        return terms.min(dim=-1).values.mean() / norm

    def train_step(self, batch: dict) -> float:
        """One optimiser step on ``batch`` (this rank's shard of the global batch); returns the
        batch's mean loss (this rank's). Raises :class:`TrainingDiverged` (on every rank) before
        touching the parameters if the loss or the gradient is not finite."""
        self.model.train()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        local_b = len(batch["index"])
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

    # --------------------------------------------------------------- outputs
    def volume(self) -> np.ndarray:
        self.model.eval()
        return decoder_to_volume(self.model.decoder, self.box).cpu().numpy().astype(np.float32)

    def write_volume(self) -> Path:
        path = self.outdir / "volume.mrc"
        if not self.is_main:
            return path
        vol = self.volume()
        write_volume(path, vol, self.pixel_size_a)
        if self.writer is not None:
            proj = vol.sum(0)
            proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-12)
            self.writer.add_image("volume/projection_z", proj[None], self.state.step)
        return path

    def checkpoint(self) -> None:
        if not self.is_main:
            return
        extra = {}
        if self.search_mode and self.state.search_done:
            extra = {"pose_rotations": self.fixed_rot, "pose_shifts_a": self.fixed_shift}
        if self.prior_lam is not None:
            extra["prior_lam"] = self.prior_lam.cpu()
        save_checkpoint(self.outdir / "checkpoint.pt", {
            **extra,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__.copy(),
            "config": self.cfg.to_dict(),
            "box_px": self.box,
            "pixel_size_a": self.pixel_size_a,
            "scale": self.scale,
            "fixed_poses": self.fixed or self.search_mode,
            "argv": list(map(str, self.argv)),
        })
        self.last_checkpoint_step = self.state.step

    def predict(self, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The encoder's poses of every particle: rotations (N, 3, 3), shifts_a (N, 2), losses (N,)."""
        loader = make_loader(self.dataset, batch_size, shuffle=False, seed=0,
                             num_workers=self.cfg.num_workers)
        return predict_poses(self.model, loader, self.mask, self.device,
                             use_symmetric=self.cfg.loss == "symmetric", learn_shifts=self.cfg.learn_shifts)

    def iter_predictions(self, batch_size: int = 128):
        """:meth:`predict` one batch at a time: yields (rotations, shifts_a) in particle order."""
        loader = make_loader(self.dataset, batch_size, shuffle=False, seed=0,
                             num_workers=self.cfg.num_workers)
        for rot, shifts, _ in iter_poses(self.model, loader, self.mask, self.device,
                                         use_symmetric=self.cfg.loss == "symmetric",
                                         learn_shifts=self.cfg.learn_shifts):
            yield rot, shifts

    def write_poses(self) -> Path:
        path = self.outdir / "poses.star"
        if not self.is_main:
            return path
        if self.search_mode:
            poses = [(self.fixed_rot.numpy(), self.fixed_shift.numpy())]
        else:
            poses = self.iter_predictions()  # streamed: no O(N) pose arrays
        write_star(path, self.table, poses=poses)
        return path

    # ------------------------------------------------------------------ loop
    def run(self, *, on_volume=None) -> dict:
        """Train until ``max_epochs`` or ``max_minutes``; write volume, checkpoint and poses.

        ``on_volume(trainer)`` is called after each periodic volume write (e.g. to compute an FSC).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.is_main:
            save_yaml(cfg, self.outdir / "config.yaml")
        n = len(self.dataset)
        if self.search_mode and not self.state.search_done:
            self.run_search()
            self.checkpoint()
        elif self.fixed and self.state.step == 0 and cfg.wiener_init:
            self.init_decoder_from_backprojection()
        self._sync_from_rank0()
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        epochs = cfg.decoder_epochs if self.search_mode else cfg.max_epochs
        total_steps = int(math.ceil(epochs * steps_per_epoch))
        t0 = time.perf_counter() - self.state.minutes * 60
        bar = tqdm(total=total_steps, initial=self.state.step, desc="train", unit="step",
                   disable=self.quiet, dynamic_ncols=True)
        with _StopOnSigint() as stop_flag:
            try:
                self._loop(total_steps, steps_per_epoch, t0, bar, on_volume, stop_flag)
            except TrainingDiverged as exc:
                # Raised before the optimiser step: the parameters are still the last good ones.
                bar.close()
                self.checkpoint()
                self.write_volume()
                raise TrainingDiverged(
                    f"{exc}; the last good state (step {self.state.step}) is saved in "
                    f"{self.outdir / 'checkpoint.pt'} and volume.mrc (lower the learning rate, then "
                    "--resume)") from None
            except InputError as exc:
                # A bad image met mid-run (the start-up checks read only a sample): keep the work.
                bar.close()
                self.checkpoint()
                self.write_volume()
                msg = str(exc).strip().splitlines()[-1] if "Traceback" in str(exc) else str(exc)
                msg = msg.split("InputError: ", 1)[-1]
                raise InputError(f"{msg}; the state at step {self.state.step} is saved in "
                                 f"{self.outdir / 'checkpoint.pt'}") from None
        bar.close()
        if stop_flag.requested:
            # Interrupted (SIGINT): the step in flight was finished; save and stop.
            self.checkpoint()
            self.write_volume()
            if not self.quiet:
                tqdm.write(f"interrupted at step {self.state.step}: checkpoint and map written to "
                           f"{self.outdir}; continue with --resume")
            raise KeyboardInterrupt
        self.checkpoint()
        vol_path = self.write_volume()
        if on_volume is not None and self.is_main:
            on_volume(self)
        if self.writer is not None:
            self.writer.flush()
        outputs = {"volume": str(vol_path), "checkpoint": str(self.outdir / "checkpoint.pt"),
                   "steps": self.state.step, "minutes": self.state.minutes,
                   "images_seen": self.state.images_seen, "version": __version__}
        if not self.fixed or self.search_mode:
            outputs["poses"] = str(self.write_poses())
        return outputs

    def _loop(self, total_steps: int, steps_per_epoch: int, t0: float, bar, on_volume,
              stop_flag: _StopOnSigint) -> None:
        cfg = self.cfg
        last_vol = last_ckpt = time.perf_counter()
        stop = False
        running = []
        log_path = self.outdir / "train_log.jsonl"
        while not stop and self.state.step < total_steps:
            start = self.state.step - self.state.epoch * steps_per_epoch
            loader = make_loader(self.dataset, cfg.batch_size, shuffle=True,
                                 seed=cfg.seed + self.state.epoch, num_workers=cfg.num_workers,
                                 start=start, rank=self.dist.rank, world_size=self.dist.world_size)
            for batch in loader:
                loss = self.train_step(batch)
                running.append((loss, len(batch["index"])))
                self.state.step += 1
                self.state.images_seen += self.last_global_batch
                self.state.minutes = (time.perf_counter() - t0) / 60
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    weight = float(sum(b for _, b in running))
                    mean_loss = float(sum(v * b for v, b in running)) / max(weight, 1.0)
                    mean_loss = weighted_mean(mean_loss, weight, self.dist, self.device)
                    running = []
                    rec = {"step": self.state.step, "epoch": self.state.epoch, "loss": mean_loss,
                           "grad_norm": self.last_grad_norm, "minutes": self.state.minutes,
                           "images": self.state.images_seen}
                    self.history.append(rec)
                    if self.is_main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{mean_loss:.4g}")
                    if self.writer is not None:
                        self.writer.add_scalar("loss/train", mean_loss, self.state.step)
                now = time.perf_counter()
                if now - last_vol > cfg.volume_every_minutes * 60 and self.is_main:
                    self.write_volume()
                    if on_volume is not None:
                        on_volume(self)
                    last_vol = now
                if now - last_ckpt > cfg.checkpoint_every_minutes * 60:
                    self.checkpoint()
                    last_ckpt = now
                want_stop = (cfg.max_minutes is not None and self.state.minutes >= cfg.max_minutes) or \
                    stop_flag.requested
                # Every rank must stop at the same step.
                want_stop = any_true(want_stop, self.dist, self.device)
                if want_stop or self.state.step >= total_steps:
                    stop = True
                    break
            else:
                self.state.epoch += 1

    @torch.no_grad()
    def _sync_from_rank0(self) -> None:
        """Make every rank hold rank 0's parameters and prior (after an initialisation that each
        rank computed on its own)."""
        if not self.dist.enabled:
            return
        for p in self.model.parameters():
            broadcast_(p.data, self.dist)
        if self.prior_lam is not None:
            broadcast_(self.prior_lam, self.dist)

    def run_search(self) -> None:
        """The search stage of ab initio (see :mod:`cryoai.training.abinitio`)."""
        from tqdm.auto import tqdm

        from .abinitio import PoseSearch

        log = (lambda msg: None) if self.quiet else tqdm.write
        t0 = time.perf_counter()
        res = PoseSearch(self.model, self.dataset, self.cfg, self.device, log=log).run()
        self.fixed_rot = torch.as_tensor(res["rotations"], dtype=torch.float32)
        self.fixed_shift = torch.as_tensor(res["shifts_a"], dtype=torch.float32)
        self.fixed = True
        self.state.search_done = True
        self.state.minutes += (time.perf_counter() - t0) / 60
        if self.dist.enabled:
            broadcast_(self.fixed_rot, self.dist)
            broadcast_(self.fixed_shift, self.dist)
        if self.cfg.wiener_init:
            self.init_decoder_from_backprojection()
        if self.is_main:
            with open(self.outdir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"stage": "search", "minutes": self.state.minutes,
                                    "search_seconds": res["seconds"]}) + "\n")

    @torch.no_grad()
    def init_decoder_from_backprojection(self) -> None:
        """Start the decoder from the half-set FSC-regularised (Wiener/MAP) reconstruction at the
        fixed poses and write the half maps. The voxel decoder is set to it and keeps its
        regulariser as a prior in the loss; FourierNet is fitted to it by regression
        (:func:`fit_decoder_to_fourier_volume`)."""
        from ..physics.fsc import resolution_px
        from .reconstruct import wiener_reconstruction

        t_start = time.perf_counter()
        mask_r = self.cfg.mask_radius_frac * self.box if self.cfg.mask_radius_frac > 0 else 0.45 * self.box
        rec = wiener_reconstruction(self.model, self.dataset, self.fixed_rot, self.fixed_shift, self.device,
                                    mask_radius_px=mask_r, seed=self.cfg.seed)
        dec = self.model.decoder
        fit_error = None
        if self.cfg.decoder == "voxel":
            dec.grid.data.copy_(torch.stack([rec["fvol"].real, rec["fvol"].imag]) / dec.scale)
            self.prior_lam = rec["lam"].float()
        else:
            from tqdm.auto import tqdm

            from .reconstruct import fit_decoder_to_fourier_volume

            log = None if self.quiet else tqdm.write
            fit_error = fit_decoder_to_fourier_volume(dec, rec["fvol"], steps=self.cfg.wiener_fit_steps,
                                                      seed=self.cfg.seed, log=log)
        self.state.minutes += (time.perf_counter() - t_start) / 60
        n = self.box
        res = resolution_px(rec["fsc_halves"], 0.143)
        self.half_map_resolution_px = res
        if not self.is_main:
            return
        for k in ("half1", "half2"):
            write_volume(self.outdir / f"volume_{k}.mrc", (rec[k] * n).cpu().numpy().astype(np.float32),
                         self.pixel_size_a)
        with open(self.outdir / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"stage": "reconstruction", "half_map_fsc_0.143_px": res,
                                "half_map_fsc_0.143_a": res * self.pixel_size_a,
                                "decoder_fit_relative_error": fit_error}) + "\n")
