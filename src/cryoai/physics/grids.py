"""Coordinate and frequency grids.

Index ``i`` of an axis of length ``N`` has coordinate ``i - N//2`` (pixels, or frequency
pixels after a centred FFT). Grids carry ``(x, y[, z])`` in their last axis.
"""

from __future__ import annotations

import torch


def centered_coords_1d(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Coordinates ``i - n//2`` for ``i = 0..n-1``, shape (n,)."""
    return torch.arange(n, device=device, dtype=dtype) - n // 2


def grid_2d(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centred 2D grid, shape (n, n, 2) with ``[..., 0] = x`` (column) and ``[..., 1] = y`` (row).

    Units are pixels; for a centred spectrum they are frequency pixels (cycles per box).
    """
    c = centered_coords_1d(n, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def grid_3d(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centred 3D grid, shape (n, n, n, 3) indexed [z, y, x] holding (x, y, z)."""
    c = centered_coords_1d(n, device=device, dtype=dtype)
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def frequency_grid_2d(n: int, pixel_size_a: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Spatial frequencies of a centred 2D spectrum in cycles per Angstrom, shape (n, n, 2)."""
    return grid_2d(n, device=device, dtype=dtype) / (n * pixel_size_a)


def radius_grid_2d(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Distance from the centre (pixels), shape (n, n)."""
    return grid_2d(n, device=device, dtype=dtype).norm(dim=-1)


def radius_grid_3d(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Distance from the centre (voxels), shape (n, n, n)."""
    return grid_3d(n, device=device, dtype=dtype).norm(dim=-1)


def half_plane_mask(n: int, *, max_radius: float | None = None, device=None) -> torch.Tensor:
    """Boolean (n, n) mask of a Hermitian half of a centred spectrum inside a radius.

    Keeps the frequencies with ``ky > 0``, or ``ky == 0 and kx >= 0`` (DC included), with
    ``|k| <= max_radius`` (default ``n//2 - 1``, which excludes the unpaired Nyquist row and
    column). The other half follows by ``F(-k) = conj(F(k))``.
    """
    g = grid_2d(n, device=device)
    kx, ky = g[..., 0], g[..., 1]
    if max_radius is None:
        max_radius = n // 2 - 1
    keep = (ky > 0) | ((ky == 0) & (kx >= 0))
    return keep & (g.norm(dim=-1) <= max_radius)


def mirror_index_2d(n: int, *, device=None) -> torch.Tensor:
    """Flat index of ``-k`` for every flat index of a centred (n, n) spectrum; Nyquist maps to itself.

    Returns a long tensor of shape (n*n,). Used to fill the Hermitian partner of a half-plane.
    """
    idx = torch.arange(n, device=device)
    neg = (n - idx) % n  # index of -k along an axis when centre is n//2 (n even)
    neg = torch.where(idx == 0, idx, neg)
    yy, xx = torch.meshgrid(neg, neg, indexing="ij")
    return (yy * n + xx).reshape(-1)
