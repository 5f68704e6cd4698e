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
    data = torch.stack([values.reshape(-1).real, values.reshape(-1).imag, weights.reshape(-1)], dim=-1)
    out = insert_channels(data, torch.tensor([1.0, -1.0, 1.0]), points_px, n)
    return torch.complex(out[0], out[1]), out[2]


def insert_channels(data: torch.Tensor, parity: torch.Tensor, points_px: torch.Tensor,
                    n: int) -> torch.Tensor:
    """Trilinear insertion of C real channels at 3D frequency points, and of their Hermitian
    mates: channel ``c`` is inserted at ``k`` and ``parity[c]`` times it at ``-k`` (+1 for a
    real part or a weight, -1 for an imaginary part), the many-channel form of
    :func:`insert_slices` (e.g. the sums of a linear model of several volumes).

    Parameters
    ----------
    data : (P, C) real values at the points (any leading shape flattened to P).
    parity : (C,) +1 or -1 per channel.
    points_px : (P, 3) points ``(x, y, z)`` in centred frequency pixels.
    n : grid size N.

    Returns
    -------
    (C, N, N, N) real sums, indexed [z, y, x].
    """
    pts = points_px.reshape(-1, 3)
    data = data.reshape(len(pts), -1).to(pts.dtype)
    # The points are inserted once, into a grid of indices 0..N; the Hermitian mates then follow
    # by reflecting that grid (index i -> N - i is -k: a flip) and conjugating, which gives the
    # same sums as inserting every -k (same trilinear weights, mirrored) at half the scatter
    # work. Index N (+N/2, outside the box) is kept until the reflection so that its mate at
    # index 0 (-N/2) is not lost; it is cropped after.
    m = n + 1
    idx = pts + n // 2
    base = torch.floor(idx)
    frac = idx - base
    base = base.long()
    out = torch.zeros(m**3, data.shape[1], dtype=pts.dtype, device=pts.device)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                cx, cy, cz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 2] if dz else 1 - frac[:, 2]))
                ok = (cx >= 0) & (cx <= n) & (cy >= 0) & (cy <= n) & (cz >= 0) & (cz <= n)
                flat = torch.where(ok, (cz * m + cy) * m + cx, 0)
                out.index_add_(0, flat, data * (w * ok)[:, None])
    out = out.T.reshape(-1, m, m, m)
    mate = out.flip(1, 2, 3) * parity.to(out)[:, None, None, None]
    return (out + mate)[:, :n, :n, :n].contiguous()


def insert_planes(values: torch.Tensor, weights: torch.Tensor, points_px: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear insertion of complex values at 2D frequency points into K grids, and of their
    Hermitian mates (the adjoint of :func:`cryoai.physics.projection.sample_planes`, the 2D
    counterpart of :func:`insert_slices`).

    Parameters
    ----------
    values : (K, Q) complex values (e.g. CTF-weighted image coefficients, per class).
    weights : (K, Q) real weights accumulated the same way (e.g. CTF^2).
    points_px : (Q, 2) points ``(x, y)`` in centred frequency pixels, the same for every grid.
    n : grid size N.

    Returns
    -------
    numerator (K, N, N) complex and denominator (K, N, N) real, indexed [y, x]; each value is
    inserted at ``k`` and its conjugate at ``-k``.
    """
    n_grids = values.shape[0]
    pts = points_px.reshape(-1, 2)
    data = torch.stack([values.real.to(pts.dtype), values.imag.to(pts.dtype),
                        weights.to(pts.dtype)], dim=-1)  # (K, Q, 3)
    m = n + 1  # index N (+N/2) kept until the reflection, as in insert_slices
    idx = pts + n // 2
    base = torch.floor(idx)
    frac = idx - base
    base = base.long()
    out = torch.zeros(n_grids, m * m, 3, dtype=pts.dtype, device=pts.device)
    for dy in (0, 1):
        for dx in (0, 1):
            cx, cy = base[:, 0] + dx, base[:, 1] + dy
            w = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
            ok = (cx >= 0) & (cx <= n) & (cy >= 0) & (cy <= n)
            flat = torch.where(ok, cy * m + cx, 0)
            out.index_add_(1, flat, data * (w * ok)[None, :, None])
    out = out.reshape(n_grids, m, m, 3)
    mate = out.flip(1, 2)
    numerator = torch.complex(out[..., 0] + mate[..., 0], out[..., 1] - mate[..., 1])[:, :n, :n]
    return numerator.contiguous(), (out[..., 2] + mate[..., 2])[:, :n, :n].contiguous()
