"""A lazy, batched particle dataset over memory-mapped stacks."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from ..io.images import ImageSource
from ..io.particles import CTF_FIELDS, ParticleTable


class ParticleDataset(Dataset):
    """Images and CTF parameters of a particle table, read lazily in batches.

    ``dataset[i]`` and ``dataset.__getitems__(indices)`` return a dict with
    ``images`` (B, N, N) float32 (sign-corrected, divided by the global scale), ``index`` (B,)
    int64, and the CTF fields of :data:`cryoai.io.particles.CTF_FIELDS` as (B,) float32
    tensors, plus ``pixel_size_a``.

    Parameters
    ----------
    table : the particles.
    invert_contrast : multiply images by -1.
    scale : divide images by this (see :func:`estimate_scale`).
    """

    def __init__(self, table: ParticleTable, *, invert_contrast: bool = False, scale: float = 1.0,
                 source: ImageSource | None = None):
        self.table = table
        self.source = source or ImageSource(table)
        self.sign = -1.0 if invert_contrast else 1.0
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.table)

    def read_images(self, indices: np.ndarray) -> torch.Tensor:
        images = self.source.read(np.asarray(indices))  # raises InputError on NaN/inf pixels
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)) * (self.sign / self.scale)

    def __getitems__(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        batch = {"images": self.read_images(idx), "index": torch.from_numpy(idx)}
        for k in ("pixel_size_a", *CTF_FIELDS):  # the table's columns, indexed per batch
            batch[k] = torch.from_numpy(np.asarray(getattr(self.table, k)[idx], dtype=np.float32))
        return batch

    def __getitem__(self, index) -> dict:
        if isinstance(index, (list, tuple, np.ndarray, torch.Tensor)):
            return self.__getitems__(index)  # a whole batch (DataLoader with a batch sampler)
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}


def collate_batch(batch):
    """Collate for a DataLoader whose dataset returns whole batches via ``__getitems__``."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def estimate_scale(table: ParticleTable, n_samples: int = 1000, seed: int = 0,
                   source: ImageSource | None = None) -> float:
    """Global intensity scale: the standard deviation of the pixels of up to ``n_samples``
    images drawn at random (one number for the whole data set, so the noise model is kept)."""
    source = source or ImageSource(table)
    rng = np.random.default_rng(seed)
    n = min(n_samples, len(table))
    idx = np.sort(rng.choice(len(table), size=n, replace=False))
    images = source.read(idx).astype(np.float64)
    if not np.isfinite(images).all():
        raise InputError(f"{table.source_path}: NaN or infinite pixels in the images")
    std = float(images.std())
    if std == 0:
        raise InputError(f"{table.source_path}: the images are all constant (zero variance)")
    return std
