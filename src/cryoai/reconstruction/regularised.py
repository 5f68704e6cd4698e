"""Regularised (MAP / Wiener) reconstruction from back-projected sums, and its half maps.

With white noise and a Gaussian prior of variance ``tau^2(k)`` per Fourier voxel, the MAP
volume minimises ``sum_i ||Y_i - C_i T_i P_{R_i} V||^2 + sum_k lambda(k) |V(k)|^2`` and is
``V = numerator / (denominator + lambda)`` with the sums of
:func:`cryoai.reconstruction.backproject.backproject`. Two regularisers are used:

- during the pose search, a constant ``lambda``, a small fraction of the mean denominator
  (:func:`regularised_volume`);
- with final poses, ``lambda`` per shell from the FSC of two independent half reconstructions
  (the "gold standard"): ``SSNR = 2 FSC / (1 - FSC)`` for the full set,
  ``lambda = mean(sum C^2) / SSNR`` (:func:`reconstruct`). The same ``lambda`` is the prior that
  keeps gradient training of the voxel decoder at this optimum.

Every map is masked in real space by a soft sphere and kept inside a frequency radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..physics.fft import fft3_c, ifft3_c
from ..physics.fsc import fsc
from ..physics.grids import max_paired_radius_px, n_shells, radius_grid_3d, shell_index
from ..physics.masks import spherical_mask
from ..physics.poses import Poses
from .backproject import backproject
from .shard import ALONE, Shard
from .spectra import ParticleSpectra

#: The most frequency points (images x coefficients) one trilinear insertion takes at a time: its
#: per-point temporaries (indices and weights of 8 corners) then stay near 100 MB at any box
#: (at 64 px a batch of 256 images is one insertion; at 256 px 63 images are).
INSERT_POINTS = 2**21


def regularised_solve(numerator: torch.Tensor, denominator: torch.Tensor, lam: torch.Tensor | float,
                      *, radius_px: float, mask: torch.Tensor) -> torch.Tensor:
    """``numerator / (denominator + lam)`` inside ``radius_px``, zero outside, then multiplied by
    ``mask`` in real space. Returns the (N, N, N) complex Fourier volume (not band-limited again
    after the mask).
    """
    inside = radius_grid_3d(numerator.shape[-1], device=numerator.device,
                            dtype=denominator.dtype) <= radius_px
    f = torch.where(inside, numerator / (denominator + lam), torch.zeros_like(numerator))
    return fft3_c(ifft3_c(f).real * mask)


def regularised_volume(numerator: torch.Tensor, denominator: torch.Tensor, *, radius_px: float,
                       mask_radius_px: float, reg_fraction: float = 0.01) -> torch.Tensor:
    """The pose search's map from back-projected sums: ``num / (den + lambda)`` with a constant
    ``lambda = reg_fraction * mean(den)`` inside ``radius_px``, masked by a soft sphere (4 px
    edge), band-limited to ``radius_px`` again. Returns (N, N, N) complex.
    """
    n = numerator.shape[-1]
    inside = radius_grid_3d(n, device=numerator.device, dtype=denominator.dtype) <= radius_px
    lam = reg_fraction * denominator[inside].mean().clamp_min(1e-12)
    mask = spherical_mask(n, mask_radius_px, soft_edge_px=4, device=numerator.device,
                          dtype=numerator.real.dtype)
    f = regularised_solve(numerator, denominator, lam, radius_px=radius_px, mask=mask)
    return torch.where(inside, f, torch.zeros_like(f))


@dataclass
class Reconstruction:
    """The half-map FSC-regularised reconstruction of :func:`reconstruct`.

    Attributes
    ----------
    fourier_volume : (N, N, N) complex, the full-set map in the decoders' 1/N Fourier scale
        (``fft3_c(volume) / N``).
    regulariser : (N, N, N) real, ``lambda`` per voxel (the prior of the voxel decoder).
    fsc_halves : (N//2 + 1,) FSC of the two half maps.
    half_maps : two (N, N, N) real half maps, each regularised for half of the data, real-space
        values in the 1/N scale (multiply by N for the map's own scale).
    """

    fourier_volume: torch.Tensor
    regulariser: torch.Tensor
    fsc_halves: torch.Tensor
    half_maps: tuple[torch.Tensor, torch.Tensor]


def half_sets(n_particles: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The two random halves (sorted particle indices) of the gold-standard split."""
    order = np.random.default_rng(seed).permutation(n_particles)
    return np.sort(order[0::2]), np.sort(order[1::2])


@torch.no_grad()
def backproject_particles(particles: ParticleSpectra, indices: np.ndarray, poses: Poses,
                          weights: torch.Tensor | None = None, *, symmetry: torch.Tensor | None = None,
                          progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`backproject` of the particles ``indices`` at their ``poses`` (all N particles'
    poses, CPU), summed over batches; with ``weights`` (all N particles', CPU), each particle's
    terms times its weight (``sum w C conj(T) Y`` and ``sum w C^2``).

    ``symmetry`` : (G, 3, 3) the operators ``S`` of the map's point group
    (:func:`cryoai.physics.symmetry.point_group`), or None (C1). A map with ``V(S x) = V(x)``
    projects the same image at the poses ``R`` and ``S R``, so each particle is inserted once
    per operator, at ``S R`` (as cryoSPARC's and RELION's reconstructions do): the sums are those
    of the symmetric map. Symmetry expansion of this kind never feeds a pose search (the
    copies are not independent data). ``progress(done, total)``: called after each batch, or None.
    """
    formation, device = particles.formation, particles.device
    n = formation.box_px
    operators = None
    if symmetry is not None and len(symmetry) > 1:
        operators = symmetry.to(device=device, dtype=torch.float32)
    num = torch.zeros(n, n, n, dtype=torch.complex64, device=device)
    den = torch.zeros(n, n, n, device=device)
    done = 0
    for idx, y, c in particles.batches(indices):
        rows = torch.as_tensor(idx)
        if weights is not None:
            root_w = weights[rows].to(device).sqrt()[:, None]
            y, c = y * root_w, c * root_w
        phases = formation.phase(poses.shifts_a[rows].to(device))
        rotations = poses.rotations[rows].to(device)
        done += len(idx)
        if progress is not None:
            progress(done, len(indices))
        step = max(1, INSERT_POINTS // max(1, formation.coords_px.shape[0]))  # images per insertion
        for op in ([None] if operators is None else operators):
            at = rotations if op is None else op @ rotations
            for s in range(0, len(idx), step):
                a, b = backproject(y[s:s + step], c[s:s + step], at[s:s + step], formation.coords_px, n,
                                   phases[s:s + step])
                num += a
                den += b
    return num, den


@torch.no_grad()
def reconstruct(particles: ParticleSpectra, poses: Poses, *, mask_radius_px: float, seed: int = 0,
                min_ssnr: float = 1e-3, indices: np.ndarray | None = None,
                symmetry: torch.Tensor | None = None) -> Reconstruction:
    """Half-set FSC-regularised (Wiener/MAP) reconstruction of every particle at its pose.

    Parameters
    ----------
    particles : the particles' spectra and CTFs.
    poses : the pose of every particle (CPU).
    mask_radius_px : radius of the soft spherical mask (4 px edge) applied to every map.
    seed : seed of the random half-set split.
    min_ssnr : floor of the spectral SNR derived from the FSC.
    indices : the particles used (e.g. those not called junk); None: all.
    symmetry : (G, 3, 3) the map's point-group operators (:func:`backproject_particles`); None:
        C1. The half sets are split by particle, so the FSC stays that of independent halves.

    Returns
    -------
    :class:`Reconstruction`. Maps are kept inside the largest paired radius (``N//2 - 1``).
    """
    sums = half_set_sums(particles, poses, seed=seed, indices=indices, symmetry=symmetry)
    return reconstruction_from_sums(sums, mask_radius_px=mask_radius_px, min_ssnr=min_ssnr)


def half_set_sums(particles: ParticleSpectra, poses: Poses, *, seed: int = 0,
                  indices: np.ndarray | None = None, symmetry: torch.Tensor | None = None,
                  progress=None, shard: Shard = ALONE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The back-projected sums ``[(num, den), (num, den)]`` of the two random half sets
    (:func:`half_sets` of ``indices``, all particles if None) at their poses: what
    :func:`reconstruct` solves, for a caller that keeps them (e.g. to update them as particles
    leave or change pose, :func:`cryoai.reconstruction.junk_sorting.sort_junk`). ``symmetry``: as
    :func:`reconstruct`'s. ``progress(what, done, total)``: after each batch, or None. ``shard``:
    under torchrun, this process back-projects its block of each half set and the sums are added
    over the processes (:mod:`cryoai.reconstruction.shard`); every process gets the whole sums.
    """
    rows = np.arange(len(particles)) if indices is None else np.asarray(indices, dtype=np.int64)
    halves = [shard.rows(h) for h in half_sets(len(rows), seed)]
    total = sum(len(h) for h in halves)
    out = []
    for k, h in enumerate(halves):
        tick = None if progress is None else (
            lambda done, _, k=k: progress("reconstruction", done + k * len(halves[0]), total))
        num, den = backproject_particles(particles, rows[h], poses, symmetry=symmetry, progress=tick)
        out.append((shard.sum_(num), shard.sum_(den)))
    return out


def reconstruction_from_sums(sums: list[tuple[torch.Tensor, torch.Tensor]], *, mask_radius_px: float,
                             min_ssnr: float = 1e-3) -> Reconstruction:
    """:func:`reconstruct` from the two half sets' back-projected sums ``[(num, den), (num, den)]``
    (:func:`backproject_particles`), e.g. sums kept up to date as particles leave or change pose.
    """
    n = sums[0][0].shape[-1]
    device = sums[0][0].device
    r_max = max_paired_radius_px(n)
    inside = radius_grid_3d(n, device=device) <= r_max
    mask = spherical_mask(n, mask_radius_px, soft_edge_px=4, device=device)

    def solve(num, den, lam):
        return regularised_solve(num, den, lam, radius_px=r_max, mask=mask)

    # First pass: a small constant regulariser, to measure the FSC of the halves.
    lam0 = 1e-2 * (sums[0][1] + sums[1][1])[inside].mean()
    h1 = solve(*sums[0], lam0)
    h2 = solve(*sums[1], lam0)
    curve = fsc(ifft3_c(h1).real, ifft3_c(h2).real).to(device)
    f = curve.clamp(1e-3, 0.999)
    ssnr = (2 * f / (1 - f)).clamp_min(min_ssnr)
    num = sums[0][0] + sums[1][0]
    den = sums[0][1] + sums[1][1]
    shells = shell_index(radius_grid_3d(n, device=device)).clamp(max=n_shells(n) - 1)
    shell_den = torch.zeros(n_shells(n), device=device, dtype=den.dtype).index_add_(
        0, shells.reshape(-1), den.reshape(-1))
    counts = torch.bincount(shells.reshape(-1), minlength=n_shells(n)).to(den.dtype)
    lam_shell = (shell_den / counts.clamp_min(1)) / ssnr.to(den.dtype)
    lam = lam_shell[shells]
    fvol = solve(num, den, lam)
    # Half maps regularised the same way (half the data: twice the relative regulariser).
    half1 = ifft3_c(solve(*sums[0], lam / 2)).real
    half2 = ifft3_c(solve(*sums[1], lam / 2)).real
    return Reconstruction(fourier_volume=fvol, regulariser=lam, fsc_halves=fsc(half1, half2),
                          half_maps=(half1, half2))


def density_skewness(volume: torch.Tensor, mask_radius_px: float) -> float:
    """Skewness of a real map's values inside a sphere: the sign of its contrast.

    A molecule is sparse positive density on a flat solvent, so its map's values are strongly
    right-skewed (1.2 to 5.9 for the maps of ../shared/data and cryoai's reconstructions of
    them); the map of images whose contrast is inverted is the negative map, left-skewed (the
    run's policy, ``inverted_skewness``, says below what a map is taken for a negative one).

    Parameters
    ----------
    volume : (N, N, N) real map.
    mask_radius_px : radius of the sphere, pixels.

    Returns
    -------
    The skewness ``E[(v - mean)^3] / std^3`` of the values inside the sphere.
    """
    n = volume.shape[-1]
    inside = radius_grid_3d(n, device=volume.device) <= mask_radius_px
    v = volume[inside].double()
    v = v - v.mean()
    return float((v**3).mean() / (v**2).mean().clamp_min(1e-300) ** 1.5)
