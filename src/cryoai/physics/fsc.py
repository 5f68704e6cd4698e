"""Fourier shell correlation and resolution estimates."""

from __future__ import annotations

import torch

from .fft import fft3_c
from .grids import n_shells, radius_grid_3d, shell_index


def fsc(volume_a: torch.Tensor, volume_b: torch.Tensor) -> torch.Tensor:
    """Fourier shell correlation of two (N, N, N) volumes.

    Shells are integer radii ``0..N//2`` (frequency pixels, nearest shell, see
    :func:`cryoai.physics.grids.shell_index`). Returns a real tensor (N//2 + 1,); shell ``s``
    has a frequency of ``s / N`` cycles per pixel.
    """
    if volume_a.shape != volume_b.shape or volume_a.dim() != 3:
        raise ValueError(f"fsc needs two volumes of the same (N, N, N) shape, got "
                         f"{tuple(volume_a.shape)} and {tuple(volume_b.shape)}")
    n = volume_a.shape[-1]
    dtype = torch.float64
    fa = fft3_c(volume_a.to(dtype))
    fb = fft3_c(volume_b.to(dtype))
    shells = shell_index(radius_grid_3d(n, device=volume_a.device, dtype=dtype)).reshape(-1)
    count = n_shells(n)
    keep = shells < count  # the corners beyond Nyquist are dropped
    shells = shells[keep]
    fa, fb = fa.reshape(-1)[keep], fb.reshape(-1)[keep]
    num = torch.zeros(count, dtype=dtype, device=fa.device).index_add_(0, shells, (fa * fb.conj()).real)
    pa = torch.zeros(count, dtype=dtype, device=fa.device).index_add_(0, shells, fa.abs() ** 2)
    pb = torch.zeros(count, dtype=dtype, device=fa.device).index_add_(0, shells, fb.abs() ** 2)
    return num / torch.sqrt(pa * pb).clamp_min(1e-30)


def resolution_px(curve: torch.Tensor, threshold: float = 0.5) -> float:
    """Resolution (period in pixels, 2.0 = Nyquist) where an FSC curve first falls below
    ``threshold``, linearly interpolated between shells. ``N = 2 * (len(curve) - 1)``.

    If the curve never falls below the threshold the Nyquist value 2.0 is returned.
    """
    c = curve.detach().cpu().double()
    n = 2 * (len(c) - 1)
    below = torch.nonzero(c[1:] < threshold)
    if len(below) == 0:
        return 2.0
    s = int(below[0]) + 1  # first shell below threshold
    c0, c1 = float(c[s - 1]), float(c[s])
    frac = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    shell = (s - 1) + frac
    return float(n / max(shell, 1e-6))
