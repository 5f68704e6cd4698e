"""Fourier phase shifts and the exact 180-degree in-plane rotation."""

from __future__ import annotations

import math

import torch


def phase_shift(freqs: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Phase factors that translate an image's content by ``shifts``.

    Parameters
    ----------
    freqs : (..., 2) frequencies ``(kx, ky)``, in cycles per unit of ``shifts`` (e.g. cycles per
        Angstrom with shifts in Angstrom, or cycles per box / N with shifts in pixels).
    shifts : (B, 2) translations ``(sx, sy)``.

    Returns
    -------
    (B, ...) complex factors ``exp(-2 pi i k . t)``: multiplying a spectrum by them moves the
    image content by ``+t``.
    """
    view = (shifts.shape[0],) + (1,) * (freqs.dim() - 1) + (2,)
    dot = (freqs[None] * shifts.reshape(view)).sum(-1)
    return torch.polar(torch.ones_like(dot), -2 * math.pi * dot)


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate real images (B, N, N) by ``shifts_px`` (B, 2) = (sx, sy) pixels (periodic, exact)."""
    from .fft import fft2_c, ifft2_c
    from .grids import grid_2d

    n = images.shape[-1]
    freqs = grid_2d(n, device=images.device, dtype=images.dtype) / n
    spec = fft2_c(images) * phase_shift(freqs, shifts_px.to(images.dtype))
    return ifft2_c(spec).real


def rotate_180(images: torch.Tensor) -> torch.Tensor:
    """Rotate even-sized images (..., N, N) by 180 degrees about the centre pixel ``N//2``.

    Pixel ``(x, y)`` goes to ``(-x, -y)`` (centred coordinates): ``roll(flip(img), 1)``. A bare
    flip would move the centre by one pixel. Row/column 0 (coordinate ``-N/2``) has no partner
    inside the box and maps to itself.
    """
    return torch.roll(torch.flip(images, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
