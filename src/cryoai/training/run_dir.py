"""The run directory: one writer for everything a run leaves on disk.

``config.yaml`` (the resolved options), ``checkpoint.pt``, ``volume.mrc`` and the half maps
``volume_half1.mrc``/``volume_half2.mrc``, ``poses.star`` and ``poses.cs`` (RELION and
cryoSPARC), ``class_averages.mrcs`` (when the search started from them), ``class_001.mrc`` ...
(the 3D classes' maps, ``--classes``), the JSON-lines logs
(``train_log.jsonl``: loss records and one record per stage; ``fsc_log.jsonl``: FSC against a
reference) and TensorBoard. Every file is written atomically (a temporary file, then a rename).
Under torch.distributed only rank 0 writes: on the other ranks every write is a no-op.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..io import write_text_atomic
from ..io._util import atomic_path
from ..io.cryosparc import write_cs
from ..io.mrc import write_stack, write_volume
from ..io.particles import ParticleTable
from ..io.star import write_star
from ..physics.poses import Poses
from .checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from .config import TrainConfig, save_yaml

#: The JSON-lines logs of a run.
TRAIN_LOG = "train_log.jsonl"
RUN_LOG = "run.log"  # every line the run says, as it says it
FSC_LOG = "fsc_log.jsonl"


def strict_json(value):
    """``value`` with what strict JSON cannot hold replaced: NaN and infinite floats by None
    (``null``), numpy scalars and arrays by Python numbers and lists, tuples by lists.
    """
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDirectory:
    """Writes a run's outputs to ``path``.

    Parameters
    ----------
    path : the run directory (created by the caller).
    writes : whether this process writes (rank 0); False makes every write a no-op.
    tensorboard : open a TensorBoard writer in ``path/tensorboard``.
    fresh : a new run (not resumed): the logs of a previous run in ``path`` are removed, not
        appended to.
    """

    def __init__(self, path: str | Path, *, writes: bool = True, tensorboard: bool = False,
                 fresh: bool = False):
        self.path = Path(path)
        self.writes = writes
        self.tensorboard = None
        if writes:
            remove_stale_temporaries(self.path)  # left by a killed run
            if fresh:  # a new run in the directory of an old one (--force): its logs start empty
                for name in (TRAIN_LOG, FSC_LOG, RUN_LOG):
                    (self.path / name).unlink(missing_ok=True)
                for stale in self.path.glob("class_[0-9][0-9][0-9].mrc"):  # an old run's 3D classes
                    stale.unlink()
        if tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.path / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt``."""
        return self.path / "checkpoint.pt"

    @property
    def volume_path(self) -> Path:
        """``volume.mrc``, the map."""
        return self.path / "volume.mrc"

    @property
    def poses_path(self) -> Path:
        """``poses.star``."""
        return self.path / "poses.star"

    @property
    def poses_cs_path(self) -> Path:
        """``poses.cs``, the same poses for cryoSPARC."""
        return self.path / "poses.cs"

    # ----------------------------------------------------------------- logs
    def log(self, record: dict, name: str = TRAIN_LOG) -> None:
        """Append one JSON record to the log ``name`` (strict JSON: :func:`strict_json`)."""
        if self.writes:
            with open(self.path / name, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def append_text(self, name: str, line: str) -> None:
        """Append one line of text to the file ``name`` (``run.log``)."""
        if self.writes:
            with open(self.path / name, "a") as f:
                f.write(line.rstrip("\n") + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard scalar (if TensorBoard is on)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)

    def truncate_logs(self, step: int) -> None:
        """Drop the log records of steps after ``step`` (work lost by a crash and about to be
        redone by ``--resume``); stage records (without a step) are kept.
        """
        if not self.writes:
            return
        for name in (TRAIN_LOG, FSC_LOG):
            path = self.path / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the crash
                if rec.get("step", 0) <= step:
                    kept.append(line)
            write_text_atomic(path, "".join(k + "\n" for k in kept))

    def flush(self) -> None:
        """Flush TensorBoard's events to disk."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    # -------------------------------------------------------------- outputs
    def write_config(self, cfg: TrainConfig) -> None:
        """``config.yaml``: the resolved options."""
        if self.writes:
            save_yaml(cfg, self.path / "config.yaml")

    def write_map(self, volume: np.ndarray, pixel_size_a: float, *, step: int | None = None) -> Path:
        """``volume.mrc`` (and its z projection in TensorBoard at ``step``)."""
        if self.writes:
            write_volume(self.volume_path, volume, pixel_size_a)
            if self.tensorboard is not None and step is not None:
                proj = volume.sum(0)
                proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-12)
                self.tensorboard.add_image("volume/projection_z", proj[None], step)
        return self.volume_path

    def write_class_averages(self, images: np.ndarray, sizes: np.ndarray, pixel_size_a: float) -> None:
        """``class_averages.mrcs``: the 2D class averages the search started from, largest class
        first, each with its size in ``train_log.jsonl`` (stage ``class_averages``).
        """
        if self.writes:
            order = np.argsort(-sizes, kind="stable")
            write_stack(self.path / "class_averages.mrcs", images[order].astype(np.float32), pixel_size_a)
            self.log({"stage": "class_averages", "sizes": [int(round(float(v))) for v in sizes[order]]})

    def write_class_maps(self, volumes: list[np.ndarray], pixel_size_a: float) -> None:
        """``class_001.mrc`` ...: the 3D classes' maps, in the order given (largest first)."""
        if self.writes:
            for i, volume in enumerate(volumes):
                write_volume(self.path / f"class_{i + 1:03d}.mrc", volume.astype(np.float32), pixel_size_a)

    def write_half_maps(self, half_maps: Iterable[np.ndarray], pixel_size_a: float) -> None:
        """``volume_half1.mrc`` and ``volume_half2.mrc``."""
        if self.writes:
            for k, half in enumerate(half_maps, start=1):
                write_volume(self.path / f"volume_half{k}.mrc", half, pixel_size_a)

    def write_poses(self, table: ParticleTable,
                    poses: Poses | Iterable[tuple[np.ndarray, np.ndarray]],
                    extra_columns: dict[str, np.ndarray] | None = None, *,
                    half_set: np.ndarray | None = None, sign: float | None = None,
                    image_paths: str = "as_read", latent: np.ndarray | None = None) -> Path:
        """``poses.star`` and ``poses.cs``: every input column of ``table`` with the poses (a
        :class:`Poses`, or (rotations, shifts_a) blocks in particle order, streamed) and
        ``extra_columns`` (label -> (N,) values, e.g. the particles' scores and classes; with a
        :class:`Poses` only).

        ``half_set`` : (N,) 0/1, the half set each particle's map went to (``rlnRandomSubset``,
        ``alignments3D/split``), or None. ``sign`` : the images' contrast as cryoSPARC's
        ``blob/sign`` (-1: protein dark). ``image_paths`` : how stack names are written
        (:data:`cryoai.io.IMAGE_PATHS`; "as_read": as the input named them). ``latent`` : (N, D)
        every particle's latent vector (``--latent-dim``): ``rlnCryoaiLatent1..D`` in the STAR,
        cryoSPARC 3DVA's ``components_mode_K/value`` in the ``.cs``.
        """
        if not self.writes:
            return self.poses_path
        if isinstance(poses, Poses):
            if latent is not None:
                extra_columns = {**(extra_columns or {}),
                                 **{f"rlnCryoaiLatent{k + 1}": np.round(latent[:, k], 5)
                                    for k in range(latent.shape[1])}}
            write_star(self.poses_path, table, poses=poses, extra_columns=extra_columns, half_set=half_set,
                       image_paths=image_paths)
            write_cs(self.poses_cs_path, table, poses=poses, half_set=half_set, sign=sign,
                     image_paths=image_paths, latent=latent)
            return self.poses_path
        # A stream (predicted batch by batch) is read once: its blocks go to poses.star and to
        # a temporary file on disk, from which poses.cs is written (memory stays flat in N).
        spill_path = self.path / ".poses.blocks.tmp"
        try:
            with open(spill_path, "wb") as spill:
                write_star(self.poses_path, table, poses=_spilled(poses, spill), image_paths=image_paths)
            with open(spill_path, "rb") as spill:
                write_cs(self.poses_cs_path, table, poses=_replayed(spill), sign=sign,
                         image_paths=image_paths)
        finally:
            spill_path.unlink(missing_ok=True)
        return self.poses_path

    # ---------------------------------------------------------- checkpoints
    def write_latent(self, model, background: torch.Tensor, pixel_size_a: float) -> Path:
        """``latent.npz``: the latent model (:class:`cryoai.reconstruction.latent.LatentModel`),
        its mean and basis on the band's Fourier grid, the consensus Fourier map beyond the band,
        every particle's latent vector and its standard deviation; read by ``cryoai analyze``.
        """
        path = self.path / "latent.npz"
        if not self.writes:
            return path
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, mean=model.mean.cpu().numpy(), basis=model.basis.cpu().numpy(),
                                background=background.cpu().numpy().astype(np.complex64),
                                box_px=model.box_px, band_px=model.band_px, pixel_size_a=pixel_size_a,
                                z=model.z, z_std=model.z_std, noise_var=model.noise_var,
                                variance=model.variance, history=np.asarray(model.history))
        return path

    def save_checkpoint(self, payload: dict) -> None:
        """Write ``checkpoint.pt`` (atomically, with the cryoai version)."""
        if self.writes:
            save_checkpoint(self.checkpoint_path, payload)

    def load_checkpoint(self, map_location) -> dict:
        """Read ``checkpoint.pt`` (tensors only: a file holding code is refused)."""
        return load_checkpoint(self.checkpoint_path, map_location=map_location)


def _spilled(blocks, spill) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Pass (rotations, shifts_a) blocks through, writing each to ``spill`` as float32 rows of
    11 values (9 of the rotation, 2 of the shift).
    """
    for rotations, shifts_a in blocks:
        rot = np.asarray(rotations, dtype=np.float32).reshape(-1, 9)
        sh = np.zeros((len(rot), 2), np.float32) if shifts_a is None else \
            np.asarray(shifts_a, dtype=np.float32).reshape(-1, 2)
        spill.write(np.concatenate([rot, sh], axis=1).tobytes())
        yield rot.reshape(-1, 3, 3), sh


def _replayed(spill, block_rows: int = 65536) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The blocks that :func:`_spilled` wrote, read back ``block_rows`` at a time."""
    while True:
        block = np.fromfile(spill, dtype=np.float32, count=11 * block_rows)
        if block.size == 0:
            return
        block = block.reshape(-1, 11)
        yield block[:, :9].reshape(-1, 3, 3), block[:, 9:]
