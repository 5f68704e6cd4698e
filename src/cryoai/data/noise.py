"""The images' noise spectrum, measured on their background, and the whitening it gives.

Real noise is not white: the ice, the detector's transfer and structural noise put more power at
low frequencies, where the pose search works (``docs/simulation.md``: half the noise power in a
low-pass component defeats a white-noise search at -9 dB). RELION and cryoSPARC model a noise
power spectrum per group of micrographs and weight every frequency by its inverse. cryoai does
the same by *whitening*: each image's spectrum and its CTF are divided by the noise amplitude
``sqrt(P_g(k))`` of its group ``g``. The model ``y = CTF V + n`` becomes
``y / sqrt(P) = (CTF / sqrt(P)) V + n'`` with ``n'`` white of unit variance per pixel, so every
later stage (the search's scores, the reconstruction's least squares, the decoder's loss, the
encoder's input) is the noise-weighted one without changing its code, and the map is the same
volume.

The spectrum is measured on the images' **background** (outside the particle's radius), so the
signal does not count as noise: each image times a soft background mask, its power spectrum
corrected for the mask's area, averaged over rings of radius ``|k|`` and over up to
``per_group`` images of each group. A group with few images is pulled towards the global
spectrum (``shrink_images`` images' worth of it), as a ring average of a hundred images is not
an exact spectrum.

Groups are the micrographs (``rlnMicrographName``, cryoSPARC's ``location/micrograph_uid``)
when the particle file names them, else one group: the whole data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..physics.masks import circular_mask

#: Noise models of ``cryoai train --noise-model``.
NOISE_MODELS = ("micrograph", "global", "white")


@dataclass
class NoiseModel:
    """Radial noise power spectra of groups of particles, and the whitening filter they give.

    Attributes
    ----------
    radial_power : (G, R) float32, the noise power per ring ``r = 0..R-1`` (frequency pixels,
        R = N//2 + 1), in units of the images' variance per pixel (white noise of variance
        ``s^2`` has ``s^2`` in every ring).
    group_of : (n,) int64, each particle's group (row of ``radial_power``).
    group_sizes : (G,) int64, the particles of each group.
    measured : (G,) int64, the images each group's spectrum was measured on.
    kind : ``"micrograph"`` or ``"global"``.
    radial_ssnr : (R,) float32, the mean spectral SNR per ring of the measured images: their
        whole-box power over their group's noise power, minus 1 (the signal the images carry at
        each frequency, in whitened units), or None.
    """

    radial_power: torch.Tensor
    group_of: np.ndarray
    group_sizes: np.ndarray
    measured: np.ndarray
    kind: str
    radial_ssnr: torch.Tensor | None = None

    def information(self, radius_px: float) -> float:
        """The whitened signal energy of a particle image within ``radius_px`` (the sum of the
        spectral SNR over the coefficients of the full spectrum there): how much a typical image
        says about its pose at that band. 0 when unknown.
        """
        if self.radial_ssnr is None:
            return 0.0
        rings = torch.arange(len(self.radial_ssnr), dtype=torch.float32)
        coefficients = torch.where(rings == 0, torch.ones(()), 2 * torch.pi * rings)
        inside = (rings >= 1) & (rings <= radius_px)
        return float((self.radial_ssnr.clamp_min(0) * coefficients)[inside].sum())

    @property
    def groups(self) -> int:
        """G, the number of groups."""
        return len(self.radial_power)

    def radial_filter(self, indices: np.ndarray) -> torch.Tensor:
        """The whitening filter ``1 / sqrt(P)`` per ring of the particles ``indices``, (B, R)."""
        rows = torch.from_numpy(self.group_of[np.asarray(indices, dtype=np.int64)])
        return self.radial_power[rows].rsqrt()

    def colour(self, low_px: float = 5.0) -> float:
        """How far from white the global spectrum is: the mean power within ``low_px`` frequency
        pixels over the mean power beyond it (1: white).
        """
        p = (self.radial_power * torch.from_numpy(self.group_sizes).float()[:, None]).sum(0)
        r = torch.arange(p.shape[0], dtype=torch.float32)
        low, high = p[(r >= 1) & (r <= low_px)], p[r > low_px]
        return float(low.mean() / high.mean()) if len(low) and len(high) else 1.0

    def summary(self) -> dict:
        """Figures for the run's log: groups, images measured, colour, spread of the levels."""
        level = self.radial_power.mean(dim=1)
        return {"noise_model": self.kind, "noise_groups": self.groups,
                "noise_images_measured": int(self.measured.sum()),
                "signal_information_10px": round(self.information(10.0), 1),
                "noise_low_over_high_power": round(self.colour(), 3),
                "noise_level_spread": round(float(level.max() / level.min()), 3)}


#: Images whose background holds less than this share of their power are taken for noise-free
#: (simulated without noise: the CTF spreads 0.1% of the signal's power there; real images hold
#: 50-99% there, their per-image SNR being -20 to 0 dB).
NOISE_FREE_FRACTION = 0.01
#: ... or whose whitened signal energy per image (:meth:`NoiseModel.information`, whole band) is
#: above this: a matched-filter SNR of 70, where real particles give 5-30 (the shared ASPIRE
#: noise-free set gives 43,670, its -10 dB set 315).
NOISE_FREE_ENERGY = 5000.0


class NoiseFree(ValueError):
    """The images have no measurable noise (simulated without it): nothing to whiten."""


def ring_interpolate(radial: torch.Tensor, radius_px: torch.Tensor) -> torch.Tensor:
    """Values per ring (B, R) at radii ``radius_px`` (any shape S): (B, *S), linear between
    rings, the last ring's value beyond it (the box's corners).
    """
    n_rings = radial.shape[-1]
    r = radius_px.clamp(0, n_rings - 1).to(radial.dtype)
    lo = r.floor().long().clamp(max=n_rings - 2)
    t = r - lo
    flat_lo, flat_t = lo.reshape(-1), t.reshape(-1)
    values = radial[:, flat_lo] * (1 - flat_t) + radial[:, flat_lo + 1] * flat_t
    return values.reshape(radial.shape[0], *radius_px.shape)


def background_mask(box_px: int, particle_radius_px: float, soft_edge_px: float = 3.0) -> torch.Tensor:
    """(N, N) float: 1 on the background (beyond ``particle_radius_px`` and a soft edge), 0 on
    the particle.
    """
    return 1.0 - circular_mask(box_px, particle_radius_px, soft_edge_px=soft_edge_px)


def background_power(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ring-averaged power spectra (B, R) of the images' background.

    Parameters
    ----------
    images : (B, N, N) real.
    mask : (N, N) background mask (:func:`background_mask`).

    Returns
    -------
    (B, N//2 + 1): for white noise of variance ``s^2`` per pixel, ``s^2`` in every ring
    (the mask's area is divided out); ring 0 (DC, removed with each image's background mean)
    takes ring 1's value.
    """
    n = images.shape[-1]
    w = mask.to(images.dtype)
    mean = (images * w).sum(dim=(-2, -1), keepdim=True) / w.sum()
    spectra = torch.fft.rfft2((images - mean) * w, norm="ortho")
    power = spectra.real**2 + spectra.imag**2  # (B, N, N//2 + 1)
    power = power * (n * n / float((w * w).sum()))
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=images.device)
    kx = torch.arange(n // 2 + 1, device=images.device, dtype=ky.dtype)
    ring = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long().clamp(max=n // 2)
    # The half spectrum counts every coefficient but the kx = 0 and Nyquist columns twice.
    weight = torch.full(ring.shape, 2.0, dtype=images.dtype, device=images.device)
    weight[:, 0] = 1.0
    if n % 2 == 0:
        weight[:, -1] = 1.0
    sums = torch.zeros(images.shape[0], n // 2 + 1, dtype=images.dtype, device=images.device)
    sums.index_add_(1, ring.reshape(-1), (power * weight).reshape(images.shape[0], -1))
    counts = torch.zeros(n // 2 + 1, dtype=images.dtype, device=images.device)
    counts.index_add_(0, ring.reshape(-1), weight.reshape(-1))
    radial = sums / counts
    radial[:, 0] = radial[:, 1]
    return radial


def estimate_noise_model(read_images, n_particles: int, box_px: int, particle_radius_px: float, *,
                         groups: np.ndarray | None = None, per_group: int = 48,
                         max_images: int = 20000, shrink_images: float = 16.0, seed: int = 0,
                         batch: int = 1024) -> NoiseModel:
    """Measure the noise spectra of the particles' groups on their background.

    Parameters
    ----------
    read_images : ``indices -> (B, N, N)`` float tensor, the images as the run reads them
        (sign-corrected and scaled, not whitened).
    n_particles : n.
    box_px : N.
    particle_radius_px : the background starts beyond this radius (and a 3 px soft edge).
    groups : (n,) group label of each particle (e.g. micrograph ids), or None: one group.
    per_group : images measured per group (at most).
    max_images : images measured in all (at most; groups are then measured on fewer each).
    shrink_images : a group's spectrum is ``(m P_g + s P) / (m + s)`` for ``m`` images measured
        and the global spectrum ``P``.
    seed : chooses the measured images.
    batch : images read at a time.

    Raises
    ------
    NoiseFree
        The background holds less than :data:`NOISE_FREE_FRACTION` of the images' power.
    """
    rng = np.random.default_rng(seed + 4242)
    if groups is None:
        group_of = np.zeros(n_particles, dtype=np.int64)
    else:
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        group_of = group_of.astype(np.int64).reshape(-1)
    n_groups = int(group_of.max()) + 1 if n_particles else 1
    sizes = np.bincount(group_of, minlength=n_groups)
    take = max(1, min(per_group, max_images // max(n_groups, 1))) if n_groups > 1 else min(max_images, 1000)
    chosen = []
    order = rng.permutation(n_particles)
    counts = np.zeros(n_groups, dtype=np.int64)
    for i in order:  # the first ``take`` of each group in a random order
        g = group_of[i]
        if counts[g] < take:
            counts[g] += 1
            chosen.append(i)
    chosen = np.sort(np.asarray(chosen, dtype=np.int64))
    mask = background_mask(box_px, particle_radius_px)
    whole = torch.ones(box_px, box_px)
    sums = torch.zeros(n_groups, box_px // 2 + 1, dtype=torch.float64)
    total_sums = torch.zeros_like(sums)
    for start in range(0, len(chosen), batch):
        idx = chosen[start:start + batch]
        images = read_images(idx).float().cpu()
        sums.index_add_(0, torch.from_numpy(group_of[idx]), background_power(images, mask).double())
        total_sums.index_add_(0, torch.from_numpy(group_of[idx]), background_power(images, whole).double())
    measured = torch.from_numpy(counts).double()
    global_power = sums.sum(0) / measured.sum()
    power = (sums + shrink_images * global_power) / (measured[:, None] + shrink_images)
    global_total = total_sums.sum(0) / measured.sum()
    if float(global_power.mean()) < NOISE_FREE_FRACTION * float(global_total.mean()):
        share = float(global_power.mean() / global_total.mean())
        raise NoiseFree(f"the images' background holds {share:.1e} of their power: noise-free images")
    floor = 1e-3 * float(global_power.mean())
    power = power.clamp_min(max(floor, 1e-30))
    # The images' spectral SNR: each group's whole-box power over its noise power, averaged.
    measured_groups = measured > 0
    ssnr = ((total_sums[measured_groups] / power[measured_groups]).sum(0) / measured.sum() - 1).float()
    model = NoiseModel(radial_power=power.float(), group_of=group_of, group_sizes=sizes.astype(np.int64),
                      measured=counts, kind="global" if n_groups == 1 else "micrograph", radial_ssnr=ssnr)
    energy = model.information(float(box_px))
    if energy > NOISE_FREE_ENERGY:
        raise NoiseFree(f"the images carry a whitened signal energy of {energy:.0f} each: noise-free images "
                        "(what their background holds is the particle's own spread signal)")
    return model


def whiten_images(images: torch.Tensor, radial_filter: torch.Tensor) -> torch.Tensor:
    """Images (B, N, N) filtered by per-image radial filters (B, R): ``ifft(F(k) fft(image))``
    with ``F`` interpolated at each frequency's radius (:func:`ring_interpolate`).
    """
    n = images.shape[-1]
    if images.shape[0] == 0:  # (an empty shard of a global batch; MKL's FFT refuses empty batches)
        return images
    spectra = torch.fft.rfft2(images)
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=images.device)
    kx = torch.arange(n // 2 + 1, device=images.device, dtype=ky.dtype)
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    gain = ring_interpolate(radial_filter.to(images.device, images.dtype), radius)  # (B, N, N//2+1)
    return torch.fft.irfft2(spectra * gain, s=(n, n))



def measure_noise(dataset, kind: str, particle_radius_px: float, *, seed: int = 0) -> NoiseModel | None:
    """The noise model ``kind`` (:data:`NOISE_MODELS`) of a :class:`ParticleDataset`'s particles,
    measured on its images as read without whitening; None for ``"white"`` and for noise-free
    images (:class:`NoiseFree`).
    """
    if kind == "white":
        return None
    table = dataset.table
    groups = table.micrograph_ids if kind == "micrograph" else None
    try:
        return estimate_noise_model(lambda idx: dataset.read_images(idx, whiten=False), len(table),
                                    table.box_px, particle_radius_px, groups=groups, seed=seed)
    except NoiseFree:
        return None
