"""Coordinate and frequency grids.

Index ``i`` of an axis of length ``N`` has coordinate ``i - N//2`` (pixels, or frequency
pixels after a centred FFT). Grids carry ``(x, y[, z])`` in their last axis.

The frequency conventions built on them live here too: Fourier shells (:func:`shell_index`,
:func:`n_shells`), the Hermitian half space (:func:`in_half_space`) and the largest radius whose
Hermitian partners are all in the box (:func:`max_paired_radius_px`).
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


def shell_index(radius: torch.Tensor) -> torch.Tensor:
    """The nearest integer Fourier shell of each frequency radius.

    Parameters
    ----------
    radius : tensor of frequency radii in frequency pixels (cycles per box), e.g. from
        :func:`radius_grid_3d`.

    Returns
    -------
    Long tensor of the same shape, ``round(radius)``.

    Notes
    -----
    Shells are integer radii in frequency pixels; shell ``s`` has a frequency of ``s / N``
    cycles per pixel. Shells ``0..N//2`` (:func:`n_shells` of them) are the ones an FSC
    reports; the corners of the box lie beyond ``N//2``, and callers clamp or drop them.
    """
    return torch.round(radius).long()


def n_shells(n: int) -> int:
    """Number of Fourier shells ``0..N//2`` of an N box (DC to Nyquist): ``N//2 + 1``."""
    return n // 2 + 1


def max_paired_radius_px(n: int) -> int:
    """The largest frequency radius (frequency pixels) whose Hermitian partners all lie in an
    even N box: ``N//2 - 1``.

    Nyquist itself is ``N/2`` cycles per box, but index 0 (frequency ``-N/2``) has no partner
    ``+N/2`` in the box; every frequency with ``|k| <= N//2 - 1`` has its partner ``-k``.
    """
    return n // 2 - 1


def in_half_space(coords: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the Hermitian half space that cryoai keeps, origin included.

    Parameters
    ----------
    coords : (..., 2) holding ``(x, y)``, or (..., 3) holding ``(x, y, z)``.

    Returns
    -------
    (...) boolean: ``y > 0 | (y == 0 & x >= 0)`` in 2D, and
    ``z > 0 | (z == 0 & (y > 0 | (y == 0 & x >= 0)))`` in 3D. Of each pair ``k, -k`` with
    ``k != 0`` exactly one is inside; the other follows by ``F(-k) = conj(F(k))``.
    """
    x, y = coords[..., 0], coords[..., 1]
    keep = (y > 0) | ((y == 0) & (x >= 0))
    if coords.shape[-1] == 2:
        return keep
    if coords.shape[-1] != 3:
        raise ValueError(f"in_half_space needs (..., 2) or (..., 3) coordinates, got {tuple(coords.shape)}")
    z = coords[..., 2]
    return (z > 0) | ((z == 0) & keep)


def half_plane_mask(n: int, *, max_radius: float | None = None, device=None) -> torch.Tensor:
    """Boolean (n, n) mask of a Hermitian half of a centred spectrum inside a radius.

    Keeps the frequencies of :func:`in_half_space` (``ky > 0``, or ``ky == 0 and kx >= 0``, DC
    included) with ``|k| <= max_radius`` (default :func:`max_paired_radius_px`, ``n//2 - 1``,
    which excludes the unpaired Nyquist row and column). The other half follows by
    ``F(-k) = conj(F(k))``.
    """
    g = grid_2d(n, device=device)
    if max_radius is None:
        max_radius = max_paired_radius_px(n)
    return in_half_space(g) & (g.norm(dim=-1) <= max_radius)


def mirror_index_2d(n: int, *, device=None) -> torch.Tensor:
    """Flat index of ``-k`` for every flat index of a centred (n, n) spectrum; Nyquist maps to itself.

    Returns a long tensor of shape (n*n,). Used to fill the Hermitian partner of a half-plane.
    """
    idx = torch.arange(n, device=device)
    neg = (n - idx) % n  # index of -k along an axis when centre is n//2 (n even)
    neg = torch.where(idx == 0, idx, neg)
    yy, xx = torch.meshgrid(neg, neg, indexing="ij")
    return (yy * n + xx).reshape(-1)
