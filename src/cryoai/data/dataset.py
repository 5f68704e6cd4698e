"""A lazy, batched particle dataset over image stacks, and the typed batch it returns."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from ..io.images import ImageSource
from ..io.particles import CTF_FIELDS, ParticleTable
from .noise import NoiseModel, whiten_images


@dataclass
class ParticleBatch:
    """Images of a batch of particles with their CTF parameters (B particles).

    Attributes
    ----------
    images : (B, N, N) float32, sign-corrected and divided by the data set's intensity scale.
    index : (B,) int64, the particles' rows in their table.
    pixel_size_a : (B,) Angstrom per pixel.
    defocus_u_a, defocus_v_a : (B,) defocus in Angstrom (positive = underfocus).
    defocus_angle_rad : (B,) astigmatism angle.
    voltage_kv : (B,) acceleration voltage.
    cs_mm : (B,) spherical aberration.
    amplitude_contrast : (B,) fraction.
    phase_shift_rad : (B,) phase-plate shift.
    bfactor_a2 : (B,) envelope B-factor, A^2.
    whitening : (B, R) or None, each image's whitening filter per frequency ring
        (:mod:`cryoai.data.noise`): the images are whitened, and the CTF must be too
        (:meth:`cryoai.models.image_formation.ImageFormation.ctf` does it).
    """

    images: torch.Tensor
    index: torch.Tensor
    pixel_size_a: torch.Tensor
    defocus_u_a: torch.Tensor
    defocus_v_a: torch.Tensor
    defocus_angle_rad: torch.Tensor
    voltage_kv: torch.Tensor
    cs_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_rad: torch.Tensor
    bfactor_a2: torch.Tensor
    whitening: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device, non_blocking: bool = False) -> ParticleBatch:
        """The batch with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def select(self, rows) -> ParticleBatch:
        """The particles ``rows`` (positions in this batch) as a batch."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if getattr(self, f.name) is not None})


class ParticleDataset(Dataset):
    """Images and CTF parameters of a particle table, read lazily in batches.

    :meth:`read` (and ``dataset[indices]``, the DataLoader's access) return a
    :class:`ParticleBatch`; ``dataset[i]`` with one integer returns a batch of one.

    Parameters
    ----------
    table : the particles.
    invert_contrast : multiply images by -1.
    scale : divide images by this (see :func:`estimate_scale`).
    source : the image reader (default: one over ``table``).

    Attributes
    ----------
    noise : a :class:`cryoai.data.noise.NoiseModel` of the table's particles, or None (white
        noise): when set, the images are whitened by it and batches carry the filter.
    """

    def __init__(self, table: ParticleTable, *, invert_contrast: bool = False, scale: float = 1.0,
                 source: ImageSource | None = None):
        self.table = table
        self.source = source or ImageSource(table)
        self.sign = -1.0 if invert_contrast else 1.0
        self.scale = float(scale)
        self.noise: NoiseModel | None = None

    def __len__(self) -> int:
        return len(self.table)

    def variant(self, *, sign: float | None = None,
                noise: NoiseModel | None | str = "same") -> ParticleDataset:
        """The same particles read with another ``sign`` (-1: contrast inverted) or ``noise``
        model (None: not whitened), as a new data set; this one is unchanged.
        """
        out = ParticleDataset(self.table, scale=self.scale, source=self.source)
        out.sign = self.sign if sign is None else float(sign)
        out.noise = self.noise if isinstance(noise, str) else noise
        return out

    def read_images(self, indices: np.ndarray, *, whiten: bool = True) -> torch.Tensor:
        """Images (B, N, N) float32 of the particles ``indices``, sign-corrected and scaled (and
        whitened by :attr:`noise` when it is set and ``whiten``).
        """
        images = self.source.read(np.asarray(indices))  # raises InputError on NaN/inf pixels
        images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)) * (self.sign / self.scale)
        if whiten and self.noise is not None:
            images = whiten_images(images, self.noise.radial_filter(indices))
        return images

    def read(self, indices) -> ParticleBatch:
        """The particles ``indices`` (rows of the table, any order) as one batch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        columns = {k: torch.from_numpy(np.asarray(getattr(self.table, k)[idx], dtype=np.float32))
                   for k in ("pixel_size_a", *CTF_FIELDS)}  # the table's columns, per batch
        whitening = None if self.noise is None else self.noise.radial_filter(idx)
        return ParticleBatch(images=self.read_images(idx), index=torch.from_numpy(idx),
                             whitening=whitening, **columns)

    def __getitem__(self, index) -> ParticleBatch:
        # The DataLoader (batch_size=None over a sampler of index lists) asks for whole batches.
        return self.read(index)


def estimate_scale(table: ParticleTable, n_samples: int = 1000, seed: int = 0,
                   source: ImageSource | None = None) -> float:
    """Global intensity scale: the standard deviation of the pixels of up to ``n_samples``
    images drawn at random (one number for the whole data set, so the noise model is kept).
    """
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


class ParticleSubset(Dataset):
    """Some particles of a :class:`ParticleDataset` (e.g. those not called junk), read as it
    reads them: position ``i`` is the particle ``rows[i]``, and batches keep the full data set's
    indices (``batch.index``), so per-particle arrays of the full set still apply.
    """

    def __init__(self, dataset: ParticleDataset, rows: np.ndarray):
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices) -> ParticleBatch:
        """The particles at positions ``indices`` of the subset, as one batch."""
        return self.dataset.read(self.rows[np.asarray(indices, dtype=np.int64).reshape(-1)])

    def __getitem__(self, index) -> ParticleBatch:
        return self.read(index)
