"""The realism layer of the simulator: what real picked particle sets throw at a method.

Each part is a switch of :class:`RealismConfig` (all off by default, so that a plain
:class:`cryoai.simulate.SimulationConfig` simulates the ideal sets it always did), and
:data:`RECIPES` names the settings of three realistic benchmarks. The figures come from
``../shared/docs/realistic-data-evidence.md`` (sources there):

- **micrographs**: particles come in groups (Poisson, about 120 per micrograph in EMPIAR-10028)
  that share their defocus (log-normal, ln 1.98 um and 0.225, clipped to 0.81-3.87 um: the
  10028 fit), astigmatism (exponential, mean 150 A, uniform angle), B-factor (uniform
  50-150 A^2), noise level and intensity scale (log-uniform); each particle's defocus is
  jittered (sd 150 A). ``rlnMicrographName`` is written;
- **junk** at a given fraction and mix (the truth file says which particle is junk, of which
  kind): ``empty`` ice; ``partial`` particles (30-45% of the projected mass cut away along a
  random line); overlapping ``neighbour`` (a second particle, in a random pose, 1-1.6 particle
  radii away); ``blob`` (an aggregate of 3-8 Gaussian blobs of the particle's mass, +-30%);
  ``off_centre`` picks (the particle moved 25-40% of the box away);
- **views**: uniform, a von Mises-Fisher cluster or a top-view cone (:mod:`.views`); the SCF
  of the true views of the real particles is reported;
- **noise**: structural noise before the CTF (white, at the signal's power over
  ``structural_snr``, as cryoDRGN's ``add_ctf.py`` and Baxter et al. 2009), and coloured noise
  after it (a share ``noise_colour`` of the noise power in a low-pass component, the rest
  white);
- **shifts**: a share ``shift_tail_fraction`` of particles shifted uniformly within
  +-``shift_tail_box_frac`` of the box instead of the Gaussian;
- **rendering at a finer pixel**: with ``output_box_px`` smaller than the map's box, images are
  formed (projection, CTF, noise) at the map's sampling and Fourier-cropped to the output box
  (CryoBench's pattern: cropping keeps the low-frequency signal and drops white noise);
- **RELION-like output**: the images are stored as RELION stores extracted particles: protein
  white, background (outside 0.75 of the box radius) normalised to mean 0 and sd 1, and
  float16 (MRC mode 12) on request.

The SNR is reported three ways (``snr_db_box``: the whole-box variance of the real particles'
noise-free images over the noise's; ``snr_db_masked``: their mean power within the particle's
radius over the noise variance; ``isnr``: their summed power over the noise variance per
pixel), and ``snr_definition`` says which of them the requested ``snr_db`` sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..physics.fft import fft2_c, ifft2_c
from ..physics.grids import grid_2d
from .views import VIEW_KINDS

JUNK_KINDS = ("empty", "partial", "neighbour", "blob", "off_centre")
SNR_DEFINITIONS = ("box", "masked", "integrated")
#: RELION's background region for normalisation: outside this fraction of the box radius.
BACKGROUND_RADIUS_FRAC = 0.75


@dataclass
class RealismConfig:
    """The realism switches (see the module docstring); the defaults switch nothing on.

    Attributes
    ----------
    micrographs : group particles into micrographs that share their CTF, noise and scale.
    particles_per_micrograph : mean of the Poisson group size.
    defocus_median_a, defocus_log_sigma, defocus_range_a : the micrographs' defocus
        (log-normal, clipped), Angstrom.
    astigmatism_mean_a : mean |dU - dV| (exponential), Angstrom.
    defocus_jitter_a : per-particle defocus sd within a micrograph, Angstrom.
    bfactor_range_a2 : the micrographs' B-factor (uniform), A^2.
    noise_scale_range : the micrographs' noise sd factor (log-uniform).
    intensity_scale_range : the micrographs' signal scale (log-uniform).
    junk_fraction : the share of picks that are junk.
    junk_mix : the relative shares of the junk kinds (normalised).
    views : ``uniform``, ``cluster``, ``top_cone`` or ``side``.
    view_axis : the preferred axis (volume frame).
    cluster_fraction, cluster_kappa : ``cluster``: the share and the vMF concentration.
    cone_half_angle_deg, cone_uniform_fraction : ``top_cone``: alpha and epsilon.
    structural_snr : structural noise before the CTF at the projections' power over this
        (cryoDRGN's snr1 1.4); None: none.
    noise_colour : the share of the (after-CTF) noise power in a low-pass component.
    shift_tail_fraction, shift_tail_box_frac : the off-centre tail of the shifts.
    output_box_px : Fourier-crop the images to this box (None: the map's box).
    normalise : RELION's background normalisation of each image.
    float16 : write MRC mode 12 stacks.
    snr_definition : what the requested SNR means: ``box``, ``masked`` or ``integrated``.
    """

    micrographs: bool = False
    particles_per_micrograph: float = 120.0
    defocus_median_a: float = 19800.0
    defocus_log_sigma: float = 0.225
    defocus_range_a: tuple[float, float] = (8100.0, 38700.0)
    astigmatism_mean_a: float = 150.0
    defocus_jitter_a: float = 150.0
    bfactor_range_a2: tuple[float, float] = (50.0, 150.0)
    noise_scale_range: tuple[float, float] = (0.8, 1.25)
    intensity_scale_range: tuple[float, float] = (2 / 3, 3 / 2)
    junk_fraction: float = 0.0
    junk_mix: dict = field(default_factory=lambda: {"empty": 0.4, "partial": 0.2, "neighbour": 0.2,
                                                    "blob": 0.2, "off_centre": 0.0})
    views: str = "uniform"
    view_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    cluster_fraction: float = 0.3
    cluster_kappa: float = 10.0
    cone_half_angle_deg: float = 30.0
    cone_uniform_fraction: float = 0.5
    structural_snr: float | None = None
    noise_colour: float = 0.0
    shift_tail_fraction: float = 0.0
    shift_tail_box_frac: float = 0.2
    output_box_px: int | None = None
    normalise: bool = False
    float16: bool = False
    snr_definition: str = "box"

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of its range."""
        if self.views not in VIEW_KINDS:
            raise ValueError(f"views {self.views!r}: choose from {', '.join(VIEW_KINDS)}")
        if self.snr_definition not in SNR_DEFINITIONS:
            raise ValueError(f"snr_definition {self.snr_definition!r}: choose from "
                             f"{', '.join(SNR_DEFINITIONS)}")
        unknown = set(self.junk_mix) - set(JUNK_KINDS)
        if unknown:
            raise ValueError(f"junk kinds {sorted(unknown)}: choose from {', '.join(JUNK_KINDS)}")
        if not 0 <= self.junk_fraction <= 1:
            raise ValueError(f"junk_fraction must be in [0, 1] (got {self.junk_fraction})")
        if self.junk_fraction > 0 and sum(max(0.0, v) for v in self.junk_mix.values()) <= 0:
            raise ValueError("junk_mix gives every junk kind a zero share")
        for name in ("cluster_fraction", "cone_uniform_fraction", "noise_colour", "shift_tail_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1] (got {value})")
        if self.particles_per_micrograph < 1:
            raise ValueError(f"particles_per_micrograph must be at least 1 (got "
                             f"{self.particles_per_micrograph})")
        if self.structural_snr is not None and self.structural_snr <= 0:
            raise ValueError(f"structural_snr must be positive (got {self.structural_snr})")
        for name in ("defocus_range_a", "bfactor_range_a2", "noise_scale_range", "intensity_scale_range"):
            lo, hi = getattr(self, name)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"{name} must be a range (low, high) with low <= high (got {(lo, hi)})")
        if min(self.noise_scale_range + self.intensity_scale_range) <= 0:
            raise ValueError("noise_scale_range and intensity_scale_range must be positive")
        if self.output_box_px is not None and (self.output_box_px < 8 or self.output_box_px % 2):
            raise ValueError(f"output_box_px must be even and at least 8 (got {self.output_box_px})")

    def junk_shares(self) -> np.ndarray:
        """The shares of :data:`JUNK_KINDS` (summing to 1)."""
        shares = np.array([max(0.0, float(self.junk_mix.get(k, 0.0))) for k in JUNK_KINDS])
        return shares / shares.sum() if shares.sum() > 0 else shares

    def to_dict(self) -> dict:
        """The settings as plain values (JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Named recipes: overrides of the simulation (``simulation``) and of the realism layer
#: (``realism``). ``realistic`` switches every part on at its documented default; the other
#: three are the benchmark recipes of realistic-data-evidence.md, section 6 (the map, box and
#: pixel size are the caller's).
RECIPES: dict[str, dict] = {
    "realistic": {
        "simulation": {"snr_db": -10.0, "shift_sigma_a": 10.0},
        "realism": {"micrographs": True, "junk_fraction": 0.25, "views": "cluster", "structural_snr": 1.4,
                    "noise_colour": 0.3, "shift_tail_fraction": 0.05, "normalise": True},
    },
    "large-complex": {
        "simulation": {"snr_db": -6.0, "shift_sigma_a": 10.0},
        "realism": {"micrographs": True, "noise_scale_range": (0.71, 1.41), "junk_fraction": 0.25,
                    "junk_mix": {"empty": 0.4, "partial": 0.2, "neighbour": 0.2, "blob": 0.2},
                    "views": "cluster", "cluster_fraction": 0.3, "cluster_kappa": 10.0,
                    "structural_snr": 1.4, "noise_colour": 0.3, "shift_tail_fraction": 0.05,
                    "normalise": True},
    },
    "membrane": {
        "simulation": {"snr_db": -15.5, "shift_sigma_a": 6.0},
        "realism": {"micrographs": True, "defocus_median_a": 16000.0, "defocus_log_sigma": 0.22,
                    "defocus_range_a": (6000.0, 30000.0), "noise_scale_range": (0.76, 1.31),
                    "junk_fraction": 0.35, "junk_mix": {"empty": 0.43, "blob": 0.285, "off_centre": 0.285},
                    "views": "top_cone", "cone_half_angle_deg": 30.0, "cone_uniform_fraction": 0.5,
                    "structural_snr": 1.4, "noise_colour": 0.3, "shift_tail_fraction": 0.1,
                    "normalise": True},
    },
    "hostile": {
        "simulation": {"snr_db": -9.0, "shift_sigma_a": 20.0},
        "realism": {"micrographs": True, "junk_fraction": 0.5,
                    "junk_mix": {"empty": 0.4, "partial": 0.2, "neighbour": 0.2, "blob": 0.2},
                    "views": "top_cone", "cone_half_angle_deg": 20.0, "cone_uniform_fraction": 0.2,
                    "structural_snr": 0.7, "noise_colour": 0.5, "shift_tail_fraction": 0.1,
                    "normalise": True},
    },
}


# ---------------------------------------------------------------------------------------------
# Micrographs


def micrograph_sizes(n_particles: int, mean: float, generator: torch.Generator) -> np.ndarray:
    """Sizes (Poisson of ``mean``, at least 1) of consecutive micrographs covering the particles."""
    sizes: list[int] = []
    total = 0
    while total < n_particles:
        draws = max(16, int(1.2 * (n_particles - total) / mean) + 1)
        batch = torch.poisson(torch.full((draws,), float(mean)), generator=generator)
        batch = batch.clamp_min(1).to(torch.int64).tolist()
        for s in batch:
            sizes.append(min(s, n_particles - total))
            total += sizes[-1]
            if total >= n_particles:
                break
    return np.asarray(sizes, dtype=np.int64)


def _log_uniform(lo_hi: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    lo, hi = math.log(lo_hi[0]), math.log(lo_hi[1])
    return torch.exp(lo + (hi - lo) * u)


def micrograph_values(cfg: RealismConfig, n_micrographs: int, generator: torch.Generator) -> dict:
    """The shared values of each micrograph (numpy arrays of length ``n_micrographs``)."""
    m = n_micrographs
    z = torch.randn(m, generator=generator, dtype=torch.float64)
    defocus = cfg.defocus_median_a * torch.exp(z * cfg.defocus_log_sigma)
    defocus = defocus.clamp(*cfg.defocus_range_a)
    astig = -cfg.astigmatism_mean_a * torch.log1p(-torch.rand(m, generator=generator, dtype=torch.float64))
    angle = torch.rand(m, generator=generator, dtype=torch.float64) * math.pi
    lo, hi = cfg.bfactor_range_a2
    bfactor = lo + (hi - lo) * torch.rand(m, generator=generator, dtype=torch.float64)
    noise = _log_uniform(cfg.noise_scale_range, torch.rand(m, generator=generator, dtype=torch.float64))
    scale = _log_uniform(cfg.intensity_scale_range, torch.rand(m, generator=generator, dtype=torch.float64))
    return {"defocus_a": defocus.numpy(), "astigmatism_a": astig.numpy(), "angle_rad": angle.numpy(),
            "bfactor_a2": bfactor.numpy(), "noise_scale": noise.numpy(), "intensity_scale": scale.numpy()}


# ---------------------------------------------------------------------------------------------
# Images


def particle_radius_px(volume: np.ndarray, *, level: float = 0.1) -> float:
    """The particle's radius (voxels): the outermost 1-voxel shell about the box centre whose
    rms density is at least ``level`` of the largest shell rms. Filtered maps have negative
    ripples inside and around the particle, so the rms (not the positive mass) marks where the
    particle ends.
    """
    vol = np.asarray(volume, dtype=np.float64)
    n = vol.shape[-1]
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    shell = np.minimum(np.round(r).astype(int), n // 2).reshape(-1)
    power = np.bincount(shell, weights=(vol**2).reshape(-1), minlength=n // 2 + 1)
    count = np.bincount(shell, minlength=n // 2 + 1)
    rms = np.sqrt(power / np.maximum(count, 1))
    if rms.max() <= 0:
        return n / 4
    return float(np.flatnonzero(rms >= level * rms.max()).max())


def cut_partial(projections: torch.Tensor, direction: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Projections with the share ``fraction`` (B,) of their positive mass cut away on one side
    of a line normal to ``direction`` (B, 2), with a 1-pixel soft edge.
    """
    b, n, _ = projections.shape
    coords = grid_2d(n, device=projections.device, dtype=projections.dtype).reshape(-1, 2)  # (N^2, 2)
    along = direction.to(projections.dtype) @ coords.T  # (B, N^2)
    mass = projections.reshape(b, -1).clamp_min(0)
    order = along.argsort(dim=-1)
    cumulative = mass.gather(1, order).cumsum(dim=-1)
    target = fraction.to(projections.dtype)[:, None] * cumulative[:, -1:]
    at = torch.searchsorted(cumulative, target).clamp(max=n * n - 1)
    cut = along.gather(1, order).gather(1, at)  # (B, 1): the line's position
    keep = torch.sigmoid((along - cut) / 1.0)
    return (projections.reshape(b, -1) * keep).reshape(b, n, n)


def gaussian_blobs(centres_px: torch.Tensor, sigmas_px: torch.Tensor, weights: torch.Tensor,
                   n: int) -> torch.Tensor:
    """Images (B, N, N) of sums of isotropic Gaussians: centres (B, K, 2) pixels from the box
    centre, sds (B, K) pixels, integrals (B, K).
    """
    coords = grid_2d(n, device=centres_px.device, dtype=centres_px.dtype)  # (N, N, 2)
    d2 = ((coords[None, None] - centres_px[:, :, None, None, :]) ** 2).sum(-1)  # (B, K, N, N)
    s2 = sigmas_px[:, :, None, None] ** 2
    g = torch.exp(-0.5 * d2 / s2) / (2 * math.pi * s2)
    return (g * weights[:, :, None, None]).sum(dim=1)


def lowpass_noise(noise: torch.Tensor, sigma_frac: float = 0.08) -> torch.Tensor:
    """White noise (B, N, N) low-passed by a Gaussian (sd ``sigma_frac`` of the box in
    frequency) and rescaled to unit variance: the low-frequency excess of real backgrounds.
    """
    n = noise.shape[-1]
    k = grid_2d(n, device=noise.device, dtype=noise.dtype).norm(dim=-1) / n
    spec = fft2_c(noise) * torch.exp(-0.5 * (k / sigma_frac) ** 2)
    out = ifft2_c(spec).real
    gain = torch.exp(-((k / sigma_frac) ** 2)).mean().sqrt()  # the filter's rms gain on white noise
    return out / gain


def background_normalise(images: torch.Tensor) -> torch.Tensor:
    """RELION's normalisation: each image (B, N, N) minus the mean of its background (outside
    :data:`BACKGROUND_RADIUS_FRAC` of the box radius), divided by the background's sd.
    """
    n = images.shape[-1]
    r = grid_2d(n, device=images.device, dtype=images.dtype).norm(dim=-1)
    outside = r > BACKGROUND_RADIUS_FRAC * n / 2
    bg = images[:, outside]
    mean = bg.mean(dim=-1)
    sd = bg.std(dim=-1).clamp_min(1e-12)
    return (images - mean[:, None, None]) / sd[:, None, None]


def particle_disk(n: int, radius_px: float, device=None) -> torch.Tensor:
    """(N, N) bool: the pixels within ``radius_px`` of the centre."""
    return grid_2d(n, device=device).norm(dim=-1) <= radius_px


__all__ = ["BACKGROUND_RADIUS_FRAC", "JUNK_KINDS", "RECIPES", "SNR_DEFINITIONS", "RealismConfig",
           "background_normalise", "cut_partial", "gaussian_blobs",
           "lowpass_noise", "micrograph_sizes", "micrograph_values", "particle_disk", "particle_radius_px"]
