"""How well each particle's projection explains it, and which particles are junk.

A picked set holds empty ice, broken and overlapping particles and aggregates (25-50% of the
picks in published sets, ``../shared/docs/realistic-data-evidence.md``). Each particle is
compared with the map's projection ``p = CTF T P_R V`` at its pose, in whitened units
(:mod:`cryoai.data.noise`: unit noise variance per pixel, so the figures are comparable across
micrographs), within the band where the map has signal:

- ``score``: the matched-filter SNR ``<y, p> / ||p||``, in noise standard deviations (pure noise
  at a fixed pose gives N(0, 1); a particle about ``||p||``);
- ``amplitude``: the least-squares scale of ``p`` in the image, ``<y, p> / ||p||^2`` (about the
  micrograph's intensity scale for a particle; near 0 for empty ice; lower for a broken one);
- ``residual_excess``: ``(||y - a p||^2 - D) / sqrt(2 D')``, the power the projection leaves
  unexplained beyond the noise's expectation ``D`` (``D'``: its variance's count), in standard
  deviations (a neighbour in the box, an aggregate, a wrong map);
- ``outer_excess``: the same residual's power in real space **outside the map's mask** (where
  the particle has no density), beyond what whitened noise leaves there, in that power's
  standard deviations (measured on simulated noise): a neighbour or contamination next to the
  particle. It separates particles with a neighbour in the box that the whole residual does not
  (on the large-complex set at the run's poses, 2.1 against 0.8 of the particles' spread).

:func:`classify_junk` separates the particles from the junk on ``(amplitude, residual_excess)``:
the particles are the largest tight cluster (the amplitude relative to its micrograph's, in units
of its expected spread among particles: :func:`amplitude_deviation`), found by a robust fit that
starts from the best-scoring particles; the rest are junk. :mod:`.junk_sorting` runs it in the
default run, with a second look at the particles it calls junk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import chi2

from ..physics.grids import radius_grid_2d
from ..physics.poses import Poses
from ..physics.projection import sample_volume, slice_coords
from ..physics.shifts import phase_shift
from .shard import ALONE, Shard
from .spectra import ParticleSpectra


@dataclass
class ParticleScores:
    """Per-particle figures of :func:`score_particles` (see the module docstring).

    Attributes
    ----------
    score, amplitude, residual_excess : (n,) float64.
    radius_px : the band used, frequency pixels.
    projection_norm : (n,) float64, ``||p||`` in noise sd (the amplitude's noise is ``1/||p||``),
        or None.
    outer_excess : (n,) float64, the residual's power outside the map's mask in sd, or None.
    """

    score: np.ndarray
    amplitude: np.ndarray
    residual_excess: np.ndarray
    radius_px: float
    projection_norm: np.ndarray | None = None
    outer_excess: np.ndarray | None = None


@torch.no_grad()
def score_spectra(formation, fourier_volume: torch.Tensor, spectra: torch.Tensor, ctf: torch.Tensor,
                  rotations: torch.Tensor, shifts_px: torch.Tensor, radius_px: float,
                  outer: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(score, amplitude, residual_excess, projection_norm)`` (B,) float64 of particles' spectra and CTFs
    (B, M) against a map at their poses (rotations (B, 3, 3), shifts in pixels (B, 2)), within
    ``radius_px`` (the module docstring's definitions); with ``outer`` (N, N) bool pixels, a
    fifth: the residual's power on those pixels (in the band), to be normalised by
    :func:`outer_noise_power`.
    """
    keep = score_band(formation, radius_px)
    coords = formation.coords_px[keep]
    weight = formation.hermitian_weight[keep].double()
    dof, dof_var = float(weight.sum()), float((weight**2).sum())
    p = sample_volume(fourier_volume, slice_coords(rotations.to(fourier_volume.real.dtype), coords))
    p = (p * phase_shift(formation.freqs_px[keep], shifts_px.to(p.real.dtype)) * ctf[:, keep]).cdouble()
    yk = spectra[:, keep].cdouble()
    cross = ((yk * p.conj()).real * weight).sum(-1)
    p_norm2 = ((p.real**2 + p.imag**2) * weight).sum(-1).clamp_min(1e-30)
    y_norm2 = ((yk.real**2 + yk.imag**2) * weight).sum(-1)
    a = cross / p_norm2
    residual = y_norm2 - 2 * a * cross + a * a * p_norm2
    values = (cross / p_norm2.sqrt(), a, (residual - dof) / np.sqrt(2 * dof_var), p_norm2.sqrt())
    if outer is None:
        return values
    full = torch.zeros(spectra.shape, dtype=spectra.dtype, device=spectra.device)
    full[:, keep] = (yk - a[:, None] * p).to(spectra.dtype)
    return (*values, _outer_power(formation, full, outer))


def score_band(formation, radius_px: float) -> torch.Tensor:
    """(M,) bool: the coefficients scored, within ``radius_px`` and without DC (the images' mean,
    not the particle).
    """
    keep = formation.band(radius_px)
    keep[(formation.coords_px == 0).all(-1)] = False
    return keep


def _outer_power(formation, spectra: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """(B,) float64: the power of the real images of ``spectra`` (B, M) on the ``outer`` pixels."""
    images = formation.low_pass_images(spectra, formation.box_px)
    return images[:, outer].double().square().sum(-1)


@torch.no_grad()
def outer_noise_power(formation, radius_px: float, outer: torch.Tensor, n_images: int = 256,
                      seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the power that whitened noise (unit variance per pixel)
    leaves on the ``outer`` pixels within the scored band, measured on ``n_images`` simulated
    noise images (band-limited noise is correlated between pixels: no simple formula).
    """
    gen = torch.Generator().manual_seed(seed)
    keep = score_band(formation, radius_px)
    images = torch.randn(n_images, formation.box_px, formation.box_px, generator=gen)
    spectra = formation.spectra(images.to(formation.coords_px.device))
    spectra[:, ~keep] = 0
    power = _outer_power(formation, spectra, outer.to(spectra.device)).cpu().numpy()
    return float(power.mean()), float(max(power.std(), 1e-12))


@torch.no_grad()
def score_particles(particles: ParticleSpectra, fourier_volume: torch.Tensor, poses: Poses,
                    radius_px: float, outer_radius_px: float | None = None,
                    shard: Shard = ALONE) -> ParticleScores:
    """Score every particle against a map at its pose (:func:`score_spectra`).

    Parameters
    ----------
    particles : the particles' (whitened) spectra and CTFs.
    fourier_volume : (N, N, N) complex, the map (1/N scale).
    poses : the pose of every particle (CPU), shifts in Angstrom.
    radius_px : the band compared, frequency pixels (where the map has signal).
    outer_radius_px : the map's mask radius, pixels: the residual's power beyond it is
        ``outer_excess``; None: not measured.
    shard : under torchrun, this process scores its block and the scores are gathered (a sum
        over the processes): every process returns every particle's.
    """
    formation = particles.formation
    n = len(particles)
    outer = None
    if outer_radius_px is not None:
        radius = radius_grid_2d(formation.box_px, device=particles.device, dtype=torch.float64)
        outer = radius > outer_radius_px
    columns = [np.zeros(n) for _ in range(4 if outer is None else 5)]
    for idx, y, c in particles.batches(shard.rows(np.arange(n))):
        rows = torch.as_tensor(idx)
        values = score_spectra(formation, fourier_volume, y, c, poses.rotations[rows].to(particles.device),
                               poses.shifts_a[rows].to(particles.device) / formation.pixel_size_a, radius_px,
                               outer)
        for out, v in zip(columns, values, strict=True):
            out[idx] = v.cpu().numpy()
    if shard.size > 1:  # every block, added (each particle scored by one process)
        columns = [shard.sum_(torch.from_numpy(col)).numpy() for col in columns]
    outer_excess = None
    if outer is not None:
        mean, sd = outer_noise_power(formation, radius_px, outer)
        outer_excess = (columns[4] - mean) / sd
    return ParticleScores(score=columns[0], amplitude=columns[1], residual_excess=columns[2],
                          radius_px=float(radius_px), projection_norm=columns[3], outer_excess=outer_excess)


def explained_signal(score: np.ndarray, information: float) -> float:
    """The share of the images' signal that the map explains at their poses: the mean of
    ``score^2 - 1`` (the matched filter's signal energy, its noise's 1 removed) over the
    images' measured whitened signal energy in the same band
    (:meth:`cryoai.data.noise.NoiseModel.information`). About 1 for a right map and poses
    (0.93-1.2 on the realistic sets with their true poses); a wrong ab initio solution explains
    a fraction of it (0.34-0.38 on two such runs), however well its half maps agree (they
    share the search's poses). NaN when the information is unknown.
    """
    if information <= 0:
        return float("nan")
    return float(np.mean(np.maximum(np.asarray(score) ** 2 - 1, 0)) / information)


@dataclass
class JunkDecision:
    """Which particles :func:`classify_junk` keeps.

    Attributes
    ----------
    keep : (n,) bool, True for particles, False for junk.
    distance : (n,) float, each particle's robust distance from the particles' cluster
        (Mahalanobis, in the cluster's standard deviations).
    threshold : the distance beyond which a particle is junk.
    centre : (2,) the cluster's centre ``(amplitude_deviation, residual_excess)``.
    """

    keep: np.ndarray
    distance: np.ndarray
    threshold: float
    centre: np.ndarray

    @property
    def junk_fraction(self) -> float:
        """The share of the particles called junk."""
        return float(1 - self.keep.mean()) if len(self.keep) else 0.0


def micrograph_amplitude(amplitude: np.ndarray, groups: np.ndarray | None, trusted: np.ndarray,
                         shrink: float = 10.0) -> np.ndarray:
    """(n,) each particle's reference amplitude: its micrograph's median amplitude over the
    ``trusted`` particles (a micrograph with few trusted particles is pulled towards the global
    median with the weight of ``shrink`` particles).
    """
    global_median = float(np.median(amplitude[trusted])) if trusted.any() else 1.0
    if groups is None:
        return np.full_like(amplitude, max(global_median, 1e-12))
    _, g = np.unique(groups, return_inverse=True)
    out = np.empty_like(amplitude)
    order = np.argsort(g, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(g[order])) + 1):
        good = rows[trusted[rows]]
        m = len(good)
        med = float(np.median(amplitude[good])) if m else global_median
        out[rows] = max((m * med + shrink * global_median) / (m + shrink), 1e-12)
    return out


def amplitude_deviation(amplitude: np.ndarray, reference: np.ndarray, projection_norm: np.ndarray,
                        inside: np.ndarray, truncation: float | None = None) -> np.ndarray:
    """(n,) each particle's relative amplitude ``a / a_ref - 1`` in units of its expected spread
    among particles: ``sqrt(s^2 + 1 / (a_ref ||p||)^2)``.

    The second term is the amplitude's noise (``1/||p||``, relative to ``a_ref``); ``s^2`` is the
    particles' own relative spread beyond it (the map fits some views and defoci better than
    others), the ``inside`` particles' variance less their median noise term. The variance is
    the squared MAD, or, with ``truncation``, the plain variance over that factor: the
    ``inside`` particles are then the core of a truncated fit (:func:`classify_junk`), whose
    variance is ``truncation`` times the whole cluster's. With noise alone (``s = 0``) this is
    the deviation in noise standard deviations, ``(a - a_ref) ||p||``. Without ``s``, a particle
    whose projection is strong (large ``||p||``) would sit many noise sd from its micrograph's
    reference for a 20% difference of fit, and empty ice posed where its projection is weak
    (small ``||p||``) only a few: on the large-complex set at the run's poses, two thirds of the
    empty images were kept.
    """
    relative = amplitude / reference - 1
    noise2 = 1.0 / np.maximum(reference * projection_norm, 1e-12) ** 2
    rows = inside if inside.sum() >= 10 else slice(None)
    core = relative[rows]
    if truncation is None:
        spread2 = (1.4826 * float(np.median(np.abs(core - np.median(core))))) ** 2
    else:
        spread2 = float(np.var(core)) / truncation
    own2 = max(spread2 - float(np.median(noise2[rows])), 0.0)
    return relative / np.sqrt(own2 + noise2)


def _top_per_group(values: np.ndarray, groups: np.ndarray | None, fraction: float) -> np.ndarray:
    """(n,) bool: the ``fraction`` highest values of each group (micrographs differ in scale)."""
    if groups is None:
        return values >= np.quantile(values, 1 - fraction)
    top = np.zeros(len(values), dtype=bool)
    _, g = np.unique(groups, return_inverse=True)
    order = np.argsort(g, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(g[order])) + 1):
        top[rows] = values[rows] >= np.quantile(values[rows], 1 - fraction)
    return top


def classify_junk(scores: ParticleScores, groups: np.ndarray | None = None, *, threshold: float,
                  core_share: float, start_fraction: float = 0.3, iterations: int = 30) -> JunkDecision:
    """Particles against junk: the largest tight cluster of ``(amplitude, residual_excess)``, and
    ``outer_excess`` when it was measured.

    The fit starts from the ``start_fraction`` best-scoring particles of each micrograph (their
    median and the covariance of their closer half, scaled to a whole Gaussian's, as the
    minimum-covariance-determinant estimator does). It then alternates: the **core**, the
    images within the radius that holds ``core_share`` of a Gaussian cluster under the
    current fit; the cluster's mean, covariance and the particles' own amplitude spread from the
    core, each corrected for the truncation (a k-D Gaussian's points within ``r^2 <= q`` hold
    ``chi2_{k+2}(q) / chi2_k(q)`` of its variance per axis); the micrographs' reference
    amplitudes from the particles within ``threshold``. Particles farther than ``threshold``
    are junk. A core of fixed radius takes in no junk that lies several of the particles'
    spreads away, however much of it there is: a fit from the closer half of the particles
    within ``threshold`` (the estimator before) grew with the junk it took in, and on the
    hostile set (half of the picks junk) took in 80% of the empty images at their true poses
    (docs/pipeline.md#junk). The distance is given on the two-feature scale
    whatever the number of features (a third feature's distance is mapped to the two-feature
    distance of the same Gaussian tail probability), so ``threshold`` 3 calls 1.1% of a
    Gaussian cluster junk either way.
    """
    n = len(scores.score)
    if n < 10:
        return JunkDecision(np.ones(n, bool), np.zeros(n), threshold, np.zeros(2))
    inside = _top_per_group(scores.score, groups, start_fraction)
    core = inside
    norm = scores.projection_norm if scores.projection_norm is not None else np.ones(n)
    extra = [scores.outer_excess] if scores.outer_excess is not None else []
    k = 2 + len(extra)
    radius2 = float(chi2.ppf(core_share, k))
    truncation = float(chi2.cdf(radius2, k + 2) / chi2.cdf(radius2, k))
    cov = None
    for _ in range(iterations):
        reference = micrograph_amplitude(scores.amplitude, groups, inside)
        feats = np.stack([amplitude_deviation(scores.amplitude, reference, norm, core,
                                              None if cov is None else truncation),
                          scores.residual_excess, *extra], 1)
        if cov is None:
            # The start: the best-scoring particles' median and the covariance of their closer
            # half, scaled to a whole Gaussian's (the inner half holds chi2_{k+2}(median) / 0.5).
            centre = np.median(feats[core], axis=0)
            d_core = feats[core] - centre
            r2 = np.einsum("ni,ij,nj->n", d_core, np.linalg.inv(np.cov(d_core.T) + 1e-9 * np.eye(k)), d_core)
            inner_var = float(chi2.cdf(chi2.ppf(0.5, k), k + 2) / 0.5)
            cov = np.cov(d_core[r2 <= np.median(r2)].T) / inner_var + 1e-9 * np.eye(k)
        else:
            centre = feats[core].mean(axis=0)
            cov = np.cov((feats[core] - centre).T) / truncation + 1e-9 * np.eye(k)
        d = feats - centre
        r2 = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
        dist = _as_two_feature_distance(np.sqrt(r2), k)
        new_core = r2 <= radius2
        new_inside = dist <= threshold
        if new_core.sum() < k + 2:
            break
        if (new_core == core).all() and (new_inside == inside).all():
            break
        core, inside = new_core, new_inside
    return JunkDecision(keep=dist <= threshold, distance=dist, threshold=threshold, centre=centre)


def _as_two_feature_distance(distance: np.ndarray, k: int) -> np.ndarray:
    """Mahalanobis distances of ``k`` features as the two-feature distances of the same Gaussian
    tail probability (unchanged where that probability underflows: far junk either way).
    """
    if k == 2:
        return distance
    tail = chi2.sf(distance**2, k)
    out = np.sqrt(chi2.isf(np.maximum(tail, 1e-300), 2))
    return np.where(tail > 0, out, distance)
