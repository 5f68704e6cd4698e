"""Continuous heterogeneity: a map per particle from a linear latent model, fitted at fixed poses.

Each particle's image is modelled as the projection of its own map ``V(z) = M + sum_k z_k B_k``,
a mean ``M`` plus ``D`` basis maps weighted by the particle's latent vector ``z`` (D numbers),
with the prior ``z ~ N(0, I)``, in the whitened images' Fourier domain:
``y = C T_s P_R V(z) + n``, ``n`` white with variance ``sigma^2`` per coefficient. It is
probabilistic PCA of the particles' maps as seen through their projections, as cryoSPARC's 3D
variability analysis (Punjani & Fleet 2021) fits it, by expectation-maximisation:

1. **E step** (every particle, a fixed cost each): the slices of ``M`` and of every ``B_k`` at
   its pose give a D-dimensional least-squares problem with a closed form, the posterior of
   ``z``: precision ``A = G / sigma^2 + I`` (``G_kl = Re <P B_k, P B_l>``), mean
   ``A^-1 <P B, y - P M> / sigma^2``. This is the model's exact amortized encoder: a map from
   the image (its pose and CTF) to its latent vector with no per-particle optimisation; a
   network would only approximate it.
2. **M step**: the mean and the basis together, voxel by voxel, from the sums of the images
   inserted with weights ``E[z~]`` and of their CTF^2 with ``E[z~ z~^T]`` (``z~ = (1, z)``):
   the ``(D+1) x (D+1)`` normal equations of every Fourier voxel, with a small ridge.
3. ``sigma^2`` from the expected residual; then the basis is turned (an orthogonal change of
   ``z``, which leaves the model and its prior the same) so that its maps are orthogonal and
   ordered by their power: ``z_1`` is the direction along which the particles' maps vary most.

The model lives on the Fourier grid within ``band_px`` (a box of ``2 band + 4`` voxels, whatever
the images' box), so its cost and memory do not grow with the box; outside the band a
particle's map is the consensus map's. Why linear, and not a neural decoder as cryoDRGN's: at
the signal per image of real data, the few directions a linear model learns are what the
data determine (cryoSPARC's 3DVA and RECOVAR make the same choice), it trains in a few passes
over the data with no learning rate, and the E step above is exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..physics.backprojection import insert_channels
from ..physics.fft import ifft3_c
from ..physics.poses import Poses
from ..physics.projection import gridding_corrected, sample_channels, slice_coords
from .spectra import ParticleSpectra


@dataclass(frozen=True)
class LatentSettings:
    """How the latent model is fitted.

    Attributes
    ----------
    dim : D, the latent dimensions (basis maps).
    band_px : the model's band, frequency pixels of the images' box (the consensus map's
        beyond it).
    iterations : EM passes over the particles.
    ridge : the M step's ridge, a fraction of the mean CTF^2 weight per voxel in the band.
    seed : the basis's random start.
    """

    dim: int
    band_px: float
    iterations: int = 12
    ridge: float = 1e-3
    seed: int = 0


@dataclass
class LatentModel:
    """A fitted linear latent model (module docstring).

    Attributes
    ----------
    mean : (nb, nb, nb) complex, ``M`` on the band's grid (centre ``nb // 2``), the decoders'
        1/N Fourier scale.
    basis : (D, nb, nb, nb) complex, the ``B_k``, orthogonal, by decreasing power.
    box_px : N, the images' box.
    band_px : the band (frequency pixels).
    z : (n, D) float32, every particle's posterior mean (NaN where not computed).
    z_std : (n, D) float32, the posterior standard deviations.
    noise_var : ``sigma^2`` per whitened coefficient.
    variance : (D,) the variance of ``z_k``'s posterior means over the fitted particles: the
        share of the particles' spread along that direction that their images determine (near 1
        for a direction the data show clearly, near 0 for one they do not; z is in standard
        deviations of the spread, posterior included).
    history : per pass, the mean expected residual power per coefficient (its length: the passes
        done).
    seconds : the fit's time.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    box_px: int
    band_px: float
    z: np.ndarray
    z_std: np.ndarray
    noise_var: float
    variance: np.ndarray
    history: list
    seconds: float

    @property
    def dim(self) -> int:
        """D."""
        return int(self.basis.shape[0])

    def fourier_volume(self, z: np.ndarray | torch.Tensor,
                       background: torch.Tensor | None = None) -> torch.Tensor:
        """The (N, N, N) complex Fourier map ``M + sum_k z_k B_k`` at one latent vector ``z``
        (D,), in the decoders' 1/N scale; outside the band, ``background`` (the consensus
        map's Fourier volume, (N, N, N)) or zero.
        """
        n, nb = self.box_px, self.mean.shape[-1]
        zt = torch.as_tensor(np.asarray(z, dtype=np.float32), device=self.mean.device).reshape(-1)
        inner = self.mean + _combined("k,kzyx->zyx", zt, self.basis)
        out = (torch.zeros(n, n, n, dtype=inner.dtype, device=inner.device) if background is None
               else background.to(inner.device, inner.dtype).clone())
        lo = n // 2 - nb // 2
        inside = _band_mask(nb, self.band_px, inner.device)
        region = out[lo:lo + nb, lo:lo + nb, lo:lo + nb]
        region[inside] = inner[inside]
        return out

    def volume(self, z, background: torch.Tensor | None = None) -> np.ndarray:
        """The real (N, N, N) float32 map at ``z`` in true amplitudes (gridding corrected)."""
        f = self.fourier_volume(z, background)
        return gridding_corrected(ifft3_c(f).real * self.box_px).cpu().numpy().astype(np.float32)


def read_latent(path) -> tuple[LatentModel, torch.Tensor, float]:
    """The latent model of a run's ``latent.npz``, the consensus Fourier map (N, N, N) beyond
    its band and the pixel size (Angstrom).

    Raises
    ------
    InputError
        A missing or unreadable file, naming it.
    """
    from pathlib import Path

    from ..errors import InputError

    path = Path(path)
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        model = LatentModel(mean=torch.as_tensor(data["mean"]), basis=torch.as_tensor(data["basis"]),
                            box_px=int(data["box_px"]), band_px=float(data["band_px"]), z=data["z"],
                            z_std=data["z_std"], noise_var=float(data["noise_var"]),
                            variance=data["variance"],
                            history=list(data["history"]), seconds=float("nan"))
    except FileNotFoundError:
        raise InputError(f"{path}: no latent model here (run cryoai train with --latent-dim D)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: not a cryoai latent model ({exc})") from None
    return model, torch.as_tensor(data["background"]), float(data["pixel_size_a"])


def _band_grid(band_px: float) -> int:
    """The band's grid: even, holding every voxel within ``band_px`` and its trilinear corners."""
    return 2 * (int(math.ceil(band_px)) + 2)


def _radius(nb: int, device) -> torch.Tensor:
    """(nb, nb, nb) each voxel's distance from the centre ``nb // 2``, voxels."""
    g = torch.arange(nb, device=device, dtype=torch.float32) - nb // 2
    return (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).sqrt()


def _band_mask(nb: int, band_px: float, device) -> torch.Tensor:
    return _radius(nb, device) <= band_px


def _combined(spec: str, weights: torch.Tensor, volumes: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(spec, weights, volumes)`` of real weights and complex Fourier volumes."""
    return torch.einsum(spec, weights.to(volumes.device, volumes.dtype), volumes)


def _crop(fourier_volume: torch.Tensor, nb: int) -> torch.Tensor:
    n = fourier_volume.shape[-1]
    lo = n // 2 - nb // 2
    return fourier_volume[lo:lo + nb, lo:lo + nb, lo:lo + nb].clone()


class _Slices:
    """The band's coefficients of a batch: the images, and the model's slices at their poses."""

    def __init__(self, formation, keep: torch.Tensor):
        self.coords = formation.coords_px[keep]
        self.weight = formation.hermitian_weight[keep]
        self.keep = keep
        self.formation = formation

    def batch(self, y, c, poses: Poses, idx: np.ndarray, volumes: torch.Tensor):
        """``(y, ctf*phase, slices (K, B, m) complex, points)`` of particles ``idx``; ``volumes``
        (2K, nb, nb, nb): real and imaginary parts of the K volumes, stacked.
        """
        rows = torch.as_tensor(idx)
        device = y.device
        phase = self.formation.phase(poses.shifts_a[rows].to(device), self.keep)
        points = slice_coords(poses.rotations[rows].to(device), self.coords)
        sampled = sample_channels(volumes, points)  # (2K, B, m)
        k = volumes.shape[0] // 2
        cphase = c[:, self.keep] * phase
        return y[:, self.keep], cphase, torch.complex(sampled[:k], sampled[k:]) * cphase[None], points


def _stacked(mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    allv = torch.cat([mean[None], basis])
    return torch.cat([allv.real, allv.imag]).contiguous()


def _posterior(y, slices, weight, noise_var: float):
    """Posterior mean (B, D) and covariance (B, D, D) of z, and the residual's expected power."""
    p0, pk = slices[0], slices[1:]
    r = y - p0
    gram = torch.einsum("kbm,lbm->bkl", pk.real * weight, pk.real) + torch.einsum(
        "kbm,lbm->bkl", pk.imag * weight, pk.imag)
    h = torch.einsum("kbm,bm->bk", pk.real * weight, r.real) + torch.einsum("kbm,bm->bk", pk.imag * weight,
                                                                              r.imag)
    d = pk.shape[0]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    cov = torch.linalg.inv(gram / noise_var + eye)
    z = torch.einsum("bkl,bl->bk", cov, h / noise_var)
    fit = r - torch.einsum("bk,kbm->bm", z.to(pk.real.dtype), pk.real) - 1j * torch.einsum(
        "bk,kbm->bm", z.to(pk.real.dtype), pk.imag)
    residual = ((fit.real**2 + fit.imag**2) * weight).sum(-1) + torch.einsum("bkl,blk->b", gram, cov)
    return z, cov, residual


@torch.no_grad()
def fit_latent(particles: ParticleSpectra, poses: Poses, rows: np.ndarray, mean_fourier: torch.Tensor,
               settings: LatentSettings, *, all_rows: np.ndarray | None = None, progress=None,
               log=None, deadline: float | None = None) -> LatentModel:
    """Fit the latent model (module docstring) to the particles ``rows`` at their ``poses``.

    Parameters
    ----------
    particles : the particles' spectra and CTFs (whitened).
    poses : every particle's pose (CPU).
    rows : the particles the model is fitted to (e.g. those not called junk).
    mean_fourier : (N, N, N) complex, the consensus map (the mean's start), 1/N scale.
    settings : :class:`LatentSettings`.
    all_rows : the particles given a latent vector after the fit (default: ``rows``).
    progress : callable(done, total) per E step batch, or None.
    log : callable(str) per iteration, or None.
    deadline : ``time.perf_counter()`` after which no further pass starts (the run's budget), or
        None; the model is then that of the passes done (``len(history)``).

    Returns
    -------
    :class:`LatentModel`.
    """
    t0 = time.perf_counter()
    formation, device = particles.formation, particles.device
    n, d = formation.box_px, settings.dim
    band = min(float(settings.band_px), n / 2 - 1)
    nb = min(_band_grid(band), n)
    keep = formation.band(band)
    view = _Slices(formation, keep)
    weight = view.weight.to(device)
    inside = _band_mask(nb, band, device)
    mean = _crop(mean_fourier.to(device), nb) * inside
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    shells = mean.abs().pow(2)[inside].mean().sqrt()
    basis = torch.complex(torch.randn(d, nb, nb, nb, generator=gen),
                          torch.randn(d, nb, nb, nb, generator=gen))
    basis = (0.1 * shells * basis.to(device) * inside).to(mean.dtype)
    basis = _hermitian(basis)
    rows = np.asarray(rows)
    total = settings.iterations * len(rows)
    done = 0
    noise_var = None
    history = []
    k1 = d + 1
    pairs = [(a, b) for a in range(k1) for b in range(a, k1)]
    parity = torch.tensor([1.0] * k1 + [-1.0] * k1 + [1.0] * len(pairs), device=device)
    spread = torch.zeros(d, int(inside.sum()), device=device)  # the basis's posterior variance per voxel
    for it in range(settings.iterations):
        sums = torch.zeros(2 * k1 + len(pairs), nb, nb, nb, device=device)
        volumes = _stacked(mean, basis)
        residual_sum = weight_sum = 0.0
        for idx, y, c in particles.batches(rows):
            yb, cphase, slices, points = view.batch(y, c, poses, idx, volumes)
            if noise_var is None:  # the start: the residual's power against the mean alone
                r0 = yb - slices[0]
                noise_var = float(((r0.real**2 + r0.imag**2) * weight).sum() / (weight.sum() * len(idx)))
            z, cov, residual = _posterior(yb, slices, weight, noise_var)
            residual_sum += float(residual.sum())
            weight_sum += float(weight.sum()) * len(idx)
            zt = torch.cat([torch.ones(len(idx), 1, device=device, dtype=z.dtype), z], dim=1)  # (B, D+1)
            second = zt[:, :, None] * zt[:, None, :]
            second[:, 1:, 1:] += cov
            back = cphase.conj() * yb  # (B, m): C conj(T) y, inserted with each E[z~_k]
            c2 = (cphase.real**2 + cphase.imag**2)
            data = torch.cat([
                (zt.T[:, :, None] * back.real[None]),
                (zt.T[:, :, None] * back.imag[None]),
                torch.stack([second[:, a, b] for a, b in pairs])[:, :, None] * c2[None],
            ]).reshape(2 * k1 + len(pairs), -1).T
            sums += insert_channels(data, parity, points.reshape(-1, 3), nb)
            done += len(idx)
            if progress is not None:
                progress(done, total)
        noise_var = residual_sum / weight_sum
        history.append(noise_var)
        # the first half of the passes find the directions (no prior); the second half weighs them
        prior = (torch.zeros(d, int(inside.sum()), device=device) if it < settings.iterations // 2
                 else _basis_prior(basis, spread, inside, noise_var))
        mean, basis, spread = _m_step(sums, k1, pairs, inside, settings.ridge, prior, noise_var)
        mean, basis = _hermitian(mean[None])[0], _hermitian(basis)
        if log is not None:
            log(f"latent model: iteration {it + 1}/{settings.iterations}, residual power {noise_var:.5f}")
        if deadline is not None and time.perf_counter() > deadline:
            break
    # every particle's latent vector under the final model; then the basis turned to principal axes
    targets = np.asarray(all_rows if all_rows is not None else rows)
    z_all = np.full((len(particles), d), np.nan, dtype=np.float32)
    z_std = np.full((len(particles), d), np.nan, dtype=np.float32)
    volumes = _stacked(mean, basis)
    zs, covs = [], []
    for idx, y, c in particles.batches(targets):
        yb, _, slices, _ = view.batch(y, c, poses, idx, volumes)
        z, cov, _ = _posterior(yb, slices, weight, noise_var)
        zs.append(z.cpu())
        covs.append(cov.cpu())
    z_t, cov_t = torch.cat(zs).double(), torch.cat(covs).double()
    fitted = torch.as_tensor(np.isin(targets, rows))
    mean, basis, z_t, cov_t = _principal_axes(mean, basis, z_t, cov_t, fitted, inside)
    z_all[targets] = z_t.float().numpy()
    z_std[targets] = torch.diagonal(cov_t, dim1=1, dim2=2).clamp_min(0).sqrt().float().numpy()
    variance = z_all[targets[np.isin(targets, rows)]].var(axis=0)
    return LatentModel(mean=mean.to(torch.complex64), basis=basis.to(torch.complex64), box_px=n, band_px=band,
                       z=z_all, z_std=z_std, noise_var=float(noise_var), variance=variance, history=history,
                       seconds=time.perf_counter() - t0)


def _principal_axes(mean, basis, z, cov, fitted: torch.Tensor, inside: torch.Tensor):
    """The model in its principal axes (an exact change of variables ``z' = T z``, ``B' = B T^-1``,
    and the z's mean moved into ``M``): the basis maps orthogonal, the fitted particles' z'
    uncorrelated with unit variance (posterior covariance included), ordered by the map variance
    each direction carries, as in a PCA of the particles' maps. A z' coordinate is then in
    standard deviations of the particles' spread, and the variance of its posterior means is the
    share of that spread the images determine (the rest is the prior's).
    """
    mu = z[fitted].mean(0)
    mean = mean + _combined("k,kzyx->zyx", mu, basis)
    z = z - mu
    second = (z[fitted, :, None] * z[fitted, None, :] + cov[fitted]).mean(0)  # E[z z^T]
    flat = torch.view_as_real(basis[:, inside]).reshape(basis.shape[0], -1).double().cpu()
    gram = flat @ flat.T
    w, v = torch.linalg.eigh(gram)
    root = v @ torch.diag(w.clamp_min(1e-30).sqrt()) @ v.T  # Gram^(1/2)
    lam, u = torch.linalg.eigh(root @ second @ root)
    order = torch.argsort(lam, descending=True)
    lam, u = lam[order].clamp_min(1e-30), u[:, order]
    t = torch.diag(lam.rsqrt()) @ u.T @ root  # z' = T z
    t_inv = torch.linalg.inv(t)
    basis = _combined("kj,kzyx->jzyx", t_inv, basis)
    return mean, basis, z @ t.T, t @ cov @ t.T


def _basis_prior(basis: torch.Tensor, spread: torch.Tensor, inside: torch.Tensor,
                 noise_var: float) -> torch.Tensor:
    """(D, V) the basis maps' prior precision at each voxel of the band, ``sigma^2 / tau^2``,
    with ``tau^2`` each basis map's expected power in the voxel's shell, its estimate's power
    plus ``spread`` (D, V), the estimate's posterior variance (the EM update of a Gaussian
    prior's variance; RELION estimates its map's prior from the map's power alike): a direction
    that the images do not support loses power at every pass, and its shells with it, until it
    is gone (automatic relevance determination), rather than fitting the noise of a few images.
    """
    shell = _radius(basis.shape[-1], basis.device)[inside].round().long()
    power = basis[:, inside].abs().square() + spread  # (D, V)
    count = torch.bincount(shell).clamp_min(1).to(power.dtype)
    tau2 = torch.stack([torch.bincount(shell, weights=p) for p in power]) / count  # (D, shells)
    return noise_var / tau2[:, shell].clamp_min(1e-30)


def _m_step(sums: torch.Tensor, k1: int, pairs, inside: torch.Tensor, ridge: float, prior: torch.Tensor,
            noise_var: float):
    """Solve every voxel's (D+1) x (D+1) normal equations: the mean (a small ridge) and the basis
    (its prior ``prior`` (D, V), :func:`_basis_prior`). Returns the mean, the basis and the
    basis's posterior variance per voxel (D, V).
    """
    nb = sums.shape[-1]
    num = torch.complex(sums[:k1], sums[k1:2 * k1])[:, inside].T  # (V, D+1)
    den = torch.zeros(num.shape[0], k1, k1, dtype=sums.dtype, device=sums.device)
    for j, (a, b) in enumerate(pairs):
        den[:, a, b] = sums[2 * k1 + j][inside]
        den[:, b, a] = sums[2 * k1 + j][inside]
    lam = ridge * den[:, 0, 0].mean().clamp_min(1e-12)
    diagonal = torch.cat([lam.expand(1, den.shape[0]), lam + prior.to(den.dtype)]).T  # (V, D+1)
    den = den + torch.diag_embed(diagonal)
    inverse = torch.linalg.inv(den)
    solved = torch.einsum("vab,vb->va", inverse.to(torch.complex64), num.to(torch.complex64))
    out = torch.zeros(k1, nb, nb, nb, dtype=torch.complex64, device=sums.device)
    out[:, inside] = solved.T
    spread = noise_var * torch.diagonal(inverse, dim1=1, dim2=2)[:, 1:].T  # (D, V)
    return out[0], out[1:], spread


def _hermitian(volumes: torch.Tensor) -> torch.Tensor:
    """Each (nb, nb, nb) Fourier volume made Hermitian (``F(-k) = conj F(k)``, centre nb // 2):
    the Fourier transform of a real map.
    """
    mate = torch.roll(torch.flip(volumes, dims=(-3, -2, -1)), shifts=(1, 1, 1), dims=(-3, -2, -1))
    return 0.5 * (volumes + mate.conj())


def latent_traversal(model: LatentModel, component: int, n_steps: int, *, rows: np.ndarray | None = None,
                     quantile: float = 0.05, through_particles: bool = True) -> np.ndarray:
    """(n_steps, D) latent vectors along ``component`` (0-based), from its ``quantile`` to its
    ``1 - quantile`` over the particles ``rows`` (default: every particle with a vector): the maps
    along one principal direction, as 3DVA's and cryoDRGN's series show it. With
    ``through_particles``, the other coordinates at each step are the mean of the particles
    nearest that value of ``z[component]`` (a twentieth of them), so that the series follows the
    particles where their motion is curved in latent space; else they are 0 (a straight line).
    """
    z = model.z if rows is None else model.z[rows]
    z = z[np.isfinite(z).all(axis=1)]
    lo, hi = np.quantile(z[:, component], [quantile, 1 - quantile])
    values = np.linspace(lo, hi, n_steps)
    out = np.zeros((n_steps, model.dim), dtype=np.float32)
    if through_particles and model.dim > 1:
        near = max(1, len(z) // 20)
        for j, v in enumerate(values):
            closest = np.argpartition(np.abs(z[:, component] - v), near - 1)[:near]
            out[j] = z[closest].mean(axis=0)
    out[:, component] = values
    return out


def kmeans_centres(z: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of latent vectors (m, D): centres (k, D) and each vector's label (m,)
    (scipy's ``kmeans2``, k-means++ start).
    """
    from scipy.cluster.vq import kmeans2

    centres, labels = kmeans2(np.asarray(z, dtype=np.float64), k, minit="++", seed=seed)
    return centres.astype(np.float32), labels


__all__ = ["LatentModel", "LatentSettings", "fit_latent", "kmeans_centres", "latent_traversal", "read_latent"]
