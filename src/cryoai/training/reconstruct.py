"""Regularised (MAP / Wiener) reconstruction with known poses, from two half sets.

With white noise and a Gaussian prior of variance ``tau^2(k)`` per Fourier voxel, the MAP
volume minimises ``sum_i ||Y_i - C_i P_{R_i} T_i V||^2 + sum_k lambda(k) |V(k)|^2`` and is
``V = sum_i C_i T_i^* Y_i (inserted) / (sum_i C_i^2 (inserted) + lambda)``. ``lambda`` per shell
is estimated from the FSC of two independent half reconstructions (the "gold standard"):
``SSNR = 2 FSC / (1 - FSC)`` for the full set, ``lambda = mean(sum C^2) / SSNR``. The same
``lambda`` is the prior term that keeps gradient training of the voxel decoder at this optimum.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics.backprojection import insert_slices
from ..physics.fft import fft3_c, ifft3_c
from ..physics.fsc import fsc
from ..physics.grids import radius_grid_3d
from ..physics.masks import spherical_mask
from ..physics.projection import slice_coords
from ..physics.shifts import phase_shift


@torch.no_grad()
def backproject(model, dataset, indices: np.ndarray, rotations: torch.Tensor, shifts_a: torch.Tensor,
                device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``sum C T^* Y`` and ``sum C^2`` inserted into (N, N, N) grids for ``indices``."""
    n = model.box_px
    num = torch.zeros(n, n, n, dtype=torch.complex64, device=device)
    den = torch.zeros(n, n, n, device=device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        batch = {k: v.to(device) for k, v in dataset.__getitems__(idx).items()}
        y = model.image_spectra(batch["images"])
        c = model.ctf(batch)
        t = torch.as_tensor(idx)
        x = c * y * phase_shift(model.freqs_a, shifts_a[t].to(device)).conj()
        a, b = insert_slices(x, c * c, slice_coords(rotations[t].to(device), model.coords_2d), n)
        num += a
        den += b
    return num, den


def _shells(n: int, device) -> torch.Tensor:
    return torch.round(radius_grid_3d(n, device=device)).long().clamp(max=n // 2)


def _masked(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return fft3_c(ifft3_c(f).real * mask)


@torch.no_grad()
def wiener_reconstruction(model, dataset, rotations: torch.Tensor, shifts_a: torch.Tensor, device, *,
                          mask_radius_px: float, seed: int = 0, min_ssnr: float = 1e-3) -> dict:
    """Half-set FSC-regularised reconstruction.

    Parameters
    ----------
    model : a CryoAI model (its coefficient layout and CTF).
    dataset : the particle dataset.
    rotations, shifts_a : (n, 3, 3), (n, 2) poses of all particles (CPU tensors).
    mask_radius_px : radius of the soft spherical mask applied to the half maps.

    Returns
    -------
    dict with ``fvol`` (N, N, N) complex (1/N Fourier scale of the decoders), ``lam`` (N, N, N)
    regulariser, ``fsc_halves`` (N//2 + 1,) and the half volumes ``half1``, ``half2`` (real).
    """
    n = model.box_px
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))
    halves = [np.sort(order[0::2]), np.sort(order[1::2])]
    sums = [backproject(model, dataset, h, rotations, shifts_a, device) for h in halves]
    shells = _shells(n, device)
    mask = spherical_mask(n, mask_radius_px, soft_edge_px=4, device=device)
    inside = radius_grid_3d(n, device=device) <= n // 2 - 1

    def solve(num, den, lam):
        f = torch.where(inside, num / (den + lam), torch.zeros_like(num))
        return _masked(f, mask)

    # First pass: a small constant regulariser, to measure the FSC of the halves.
    lam0 = 1e-2 * (sums[0][1] + sums[1][1])[inside].mean()
    h1 = solve(*sums[0], lam0)
    h2 = solve(*sums[1], lam0)
    curve = fsc(ifft3_c(h1).real, ifft3_c(h2).real).to(device)
    f = curve.clamp(1e-3, 0.999)
    ssnr = (2 * f / (1 - f)).clamp_min(min_ssnr)
    num = sums[0][0] + sums[1][0]
    den = sums[0][1] + sums[1][1]
    shell_den = torch.zeros(n // 2 + 1, device=device, dtype=den.dtype).index_add_(
        0, shells.reshape(-1), den.reshape(-1))
    counts = torch.bincount(shells.reshape(-1), minlength=n // 2 + 1).to(den.dtype)
    lam_shell = (shell_den / counts.clamp_min(1)) / ssnr.to(den.dtype)
    lam = lam_shell[shells]
    fvol = solve(num, den, lam)
    # Half maps regularised the same way (half the data: twice the relative regulariser).
    half1 = ifft3_c(solve(*sums[0], lam / 2)).real
    half2 = ifft3_c(solve(*sums[1], lam / 2)).real
    return {"fvol": fvol, "lam": lam, "fsc_halves": fsc(half1, half2), "half1": half1, "half2": half2}


def fit_decoder_to_fourier_volume(decoder, fvol: torch.Tensor, *, steps: int, batch_points: int = 8192,
                                  lr: float = 1e-4, seed: int = 0, log=None) -> float:
    """Fit a neural-field decoder (e.g. FourierNet) to a Fourier volume by regression.

    The loss is the squared error at points of the upper half-space inside the Nyquist sphere
    (the rest follows by Hermitian symmetry), each divided by the mean power of its shell, so
    that every resolution shell weighs the same (Fourier amplitudes fall by orders of magnitude
    from the centre to Nyquist). A fit to the regularised reconstruction at known poses starts
    the decoder near the MAP solution far faster than fitting images one slice at a time.

    Parameters
    ----------
    decoder : a module with ``_raw(coords (P, 3)) -> (P,) complex`` in the decoders' scale.
    fvol : (N, N, N) complex target, the decoders' ``fft3_c(volume) / N`` convention.
    steps : optimiser steps (Adam) of ``batch_points`` random points each.
    log : optional callable(str) for progress lines.

    Returns
    -------
    The shell-normalised loss of the last 50 steps (mean), a relative squared error.
    """
    from ..physics.grids import grid_3d

    n = fvol.shape[-1]
    device = fvol.device
    g = grid_3d(n, device=device).reshape(-1, 3)
    r = g.norm(dim=-1)
    x, y, z = g.unbind(-1)
    upper = (z > 0) | ((z == 0) & ((y > 0) | ((y == 0) & (x >= 0))))
    sel = upper & (r <= n // 2 - 1)
    pts, vals = g[sel], fvol.reshape(-1)[sel].to(torch.complex64)
    shell = torch.round(r[sel]).long()
    counts = torch.bincount(shell, minlength=n // 2 + 1).clamp_min(1)
    power = torch.zeros(n // 2 + 1, device=device).index_add_(0, shell, vals.abs() ** 2) / counts
    weight = 1.0 / power[shell].clamp_min(1e-30)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    recent: list[float] = []
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(len(pts), (batch_points,), generator=gen).to(device)
            pred = decoder._raw(pts[idx])
            loss = (weight[idx] * (pred - vals[idx]).abs() ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            recent = (recent + [float(loss.detach())])[-50:]
            if log is not None and (step + 1) % max(1, steps // 10) == 0:
                log(f"fit decoder to the reconstruction: step {step + 1}/{steps}, relative error "
                    f"{np.mean(recent):.4f}")
    return float(np.mean(recent)) if recent else float("nan")
