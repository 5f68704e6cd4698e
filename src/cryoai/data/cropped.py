"""The particles at a smaller box: the images Fourier-cropped as they are read, and a table
whose box and pixel size say so.

The default run searches for poses on images cropped to the band its search uses (a search at
10 frequency px needs no more than a 64 px box, whatever the box the particles were extracted
at); poses (rotations, shifts in Angstrom) carry over to the full box unchanged. A Fourier crop
keeps the frequencies in cycles per box (the same extent in Angstrom), so every band the search
uses in frequency px means the same at either box.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..io.particles import ParticleTable
from ..physics.fft import fourier_crop_2d


def cropped_table(table: ParticleTable, box_px: int) -> ParticleTable:
    """The same particles at ``box_px`` (even, at most the table's box): the box and the pixel
    size changed (``pixel_size_a * box / box_px``), everything else the same.
    """
    if box_px % 2 or table.box_px % 2 or not 0 < box_px <= table.box_px:
        raise ValueError(f"cannot crop a {table.box_px} px box to {box_px} px (even sizes, not larger)")
    factor = table.box_px / box_px
    pixel_size_a = np.asarray(table.pixel_size_a, np.float32) * factor
    return replace(table, box_px=int(box_px), pixel_size_a=pixel_size_a)


class FourierCroppedSource:
    """An image reader (:class:`cryoai.io.images.ImageSource`'s ``read``/``validate``) whose
    images are Fourier-cropped to ``box_px`` (band-limited resampling: the mean is kept).

    Parameters
    ----------
    source : the reader of the full-box images.
    box_px : the box read (even, at most the source's).
    """

    def __init__(self, source, box_px: int):
        if box_px % 2 or not 0 < box_px <= source.box:
            raise ValueError(f"cannot crop a {source.box} px box to {box_px} px (even sizes, not larger)")
        self.source, self.box = source, int(box_px)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(images, box, box)."""
        return (len(self), self.box, self.box)

    def validate(self) -> None:
        """The full-box stacks' check (:meth:`ImageSource.validate`)."""
        self.source.validate()

    def read(self, indices) -> np.ndarray:
        """Images (B, box, box) float32 of rows ``indices``, cropped."""
        images = torch.from_numpy(np.ascontiguousarray(self.source.read(indices), dtype=np.float32))
        if self.box == self.source.box:
            return images.numpy()
        return fourier_crop_2d(images, self.box).numpy()

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]


def cropped_dataset(dataset, box_px: int, scale: float | None = None, n_samples: int = 1000,
                    seed: int = 0):
    """``dataset``'s particles Fourier-cropped to ``box_px`` as they are read (the same sign;
    no noise model: measure one at this box), divided by ``scale`` (None: measured on the
    cropped images, :func:`cryoai.data.dataset.estimate_scale`).
    """
    from .dataset import ParticleDataset, estimate_scale

    table = cropped_table(dataset.table, box_px)
    source = FourierCroppedSource(dataset.source, box_px)
    if scale is None:
        scale = estimate_scale(table, n_samples, seed, source=source)
    return ParticleDataset(table, invert_contrast=dataset.sign < 0, scale=scale, source=source)


def cropped_fourier_volume(fourier_volume: torch.Tensor, box_px: int,
                           scale_ratio: float = 1.0) -> torch.Tensor:
    """A centred Fourier volume (N, N, N) (:func:`cryoai.physics.fft.fft3_c` / N, the layout of
    the run's maps) at ``box_px``: the central ``box_px``^3 coefficients, scaled so that its
    projections match images cropped by :class:`FourierCroppedSource` (their spectra, at 1/box,
    are ``box_px / N`` of the full box's), times ``scale_ratio`` (the full box's intensity
    scale over the cropped images').
    """
    n = fourier_volume.shape[-1]
    lo = n // 2 - box_px // 2
    s = slice(lo, lo + box_px)
    return fourier_volume[s, s, s] * (box_px / n * scale_ratio)


__all__ = ["FourierCroppedSource", "cropped_dataset", "cropped_fourier_volume", "cropped_table"]
