"""Insertion of 2D Fourier slices into a 3D Fourier grid (the adjoint of slicing)."""

from __future__ import annotations

import torch


def insert_slices(values: torch.Tensor, weights: torch.Tensor, points_px: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear insertion of complex values at 3D frequency points, and of their Hermitian mates.

    Parameters
    ----------
    values : (...,) complex values (e.g. CTF-weighted image coefficients).
    weights : (...,) real weights accumulated the same way (e.g. CTF^2).
    points_px : (..., 3) points ``(x, y, z)`` in centred frequency pixels.
    n : grid size N.

    Returns
    -------
    numerator (N, N, N) complex and denominator (N, N, N) real, indexed [z, y, x]. Each value is
    inserted at ``k`` and its conjugate at ``-k``, so ``numerator / denominator`` is Hermitian.
    """
    pts = points_px.reshape(-1, 3)
    vals = values.reshape(-1)
    wts = weights.reshape(-1).to(pts.dtype)
    pts = torch.cat([pts, -pts])
    vals = torch.cat([vals, vals.conj()])
    wts = torch.cat([wts, wts])
    idx = pts + n // 2
    base = torch.floor(idx)
    frac = idx - base
    base = base.long()
    num_r = torch.zeros(n**3, dtype=pts.dtype, device=pts.device)
    num_i = torch.zeros_like(num_r)
    den = torch.zeros_like(num_r)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                cx, cy, cz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 2] if dz else 1 - frac[:, 2]))
                ok = (cx >= 0) & (cx < n) & (cy >= 0) & (cy < n) & (cz >= 0) & (cz < n)
                flat = (cz * n + cy) * n + cx
                flat, w_ok = flat[ok], w[ok]
                num_r.index_add_(0, flat, w_ok * vals.real[ok].to(pts.dtype))
                num_i.index_add_(0, flat, w_ok * vals.imag[ok].to(pts.dtype))
                den.index_add_(0, flat, w_ok * wts[ok])
    shape = (n, n, n)
    return torch.complex(num_r, num_i).reshape(shape), den.reshape(shape)
