"""Fitting a neural-field decoder to a Fourier volume by regression (FourierNet's start)."""

from __future__ import annotations

import numpy as np
import torch

from ..physics.grids import grid_3d, in_half_space, max_paired_radius_px, n_shells, shell_index


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
    decoder : a decoder with ``half_space_values(coords (P, 3)) -> (P,) complex`` (its values
        in the upper half space, before the Hermitian fold), 1/N scale.
    fvol : (N, N, N) complex target, the decoders' ``fft3_c(volume) / N`` convention.
    steps : optimiser steps (Adam) of ``batch_points`` random points each.
    log : optional callable(str) for progress lines.

    Returns
    -------
    The shell-normalised loss of the last 50 steps (mean), a relative squared error.
    """
    n = fvol.shape[-1]
    device = fvol.device
    g = grid_3d(n, device=device).reshape(-1, 3)
    r = g.norm(dim=-1)
    sel = in_half_space(g) & (r <= max_paired_radius_px(n))
    pts, vals = g[sel], fvol.reshape(-1)[sel].to(torch.complex64)
    shell = shell_index(r[sel])
    counts = torch.bincount(shell, minlength=n_shells(n)).clamp_min(1)
    power = torch.zeros(n_shells(n), device=device).index_add_(0, shell, vals.abs() ** 2) / counts
    weight = 1.0 / power[shell].clamp_min(1e-30)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    recent: list[float] = []
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(len(pts), (batch_points,), generator=gen).to(device)
            pred = decoder.half_space_values(pts[idx])
            loss = (weight[idx] * (pred - vals[idx]).abs() ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            recent = (recent + [float(loss.detach())])[-50:]
            if log is not None and (step + 1) % max(1, steps // 10) == 0:
                log(f"fit decoder to the reconstruction: step {step + 1}/{steps}, relative error "
                    f"{np.mean(recent):.4f}")
    return float(np.mean(recent)) if recent else float("nan")
