"""Circular masks and soft windows."""

from __future__ import annotations

import math

import torch

from .grids import radius_grid_2d, radius_grid_3d

#: Radius of the mask of reconstructed maps, fraction of the box, when ``mask_radius_frac`` is 0.
MAP_MASK_RADIUS_FRAC = 0.45


def map_mask_radius_px(box_px: int, mask_radius_frac: float) -> float:
    """Radius (pixels) of the soft spherical mask applied to reconstructed maps.

    Parameters
    ----------
    box_px : N.
    mask_radius_frac : the configured mask radius as a fraction of the box (``mask_radius_frac``
        of the training configuration).

    Returns
    -------
    ``mask_radius_frac * box_px`` if ``mask_radius_frac > 0``, else
    ``MAP_MASK_RADIUS_FRAC * box_px`` (0.45 of the box): 0 turns the encoder-input mask off,
    but maps are always masked.
    """
    return mask_radius_frac * box_px if mask_radius_frac > 0 else MAP_MASK_RADIUS_FRAC * box_px


def circular_mask(n: int, radius_px: float | None = None, *, soft_edge_px: float = 0.0,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Disk mask (n, n): 1 inside ``radius_px`` (default ``n/2``), raised-cosine edge of width
    ``soft_edge_px`` outside it, 0 beyond.
    """
    r = radius_grid_2d(n, device=device, dtype=dtype)
    return _radial_window(r, n / 2 if radius_px is None else radius_px, soft_edge_px)


def spherical_mask(n: int, radius_px: float | None = None, *, soft_edge_px: float = 0.0,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Ball mask (n, n, n), same profile as :func:`circular_mask`."""
    r = radius_grid_3d(n, device=device, dtype=dtype)
    return _radial_window(r, n / 2 if radius_px is None else radius_px, soft_edge_px)


def _radial_window(r: torch.Tensor, radius: float, soft: float) -> torch.Tensor:
    if soft <= 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / soft).clamp(0.0, 1.0)
    return 0.5 * (1 + torch.cos(math.pi * t))


def soft_edge_window_2d(n: int, width_px: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Separable window (n, n) that is 1 in the interior and falls to 0 at the box edge by a
    raised cosine over ``width_px`` pixels (to suppress edge artefacts before an FFT).
    """
    i = torch.arange(n, device=device, dtype=dtype)
    d = torch.minimum(i, n - 1 - i)
    t = (d / max(width_px, 1e-6)).clamp(0.0, 1.0)
    w = 0.5 * (1 - torch.cos(math.pi * t))
    return w[:, None] * w[None, :]
