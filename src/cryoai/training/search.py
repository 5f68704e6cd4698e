"""Pose search against a Fourier volume, and stochastic expectation-maximisation ab initio.

The squared error of an image ``Y`` (spectrum, CTF ``C``) against the projection ``P_r`` of a
rotation ``r`` shifted by ``s`` (phase ``T_s``) expands as
``||Y||^2 - 2 Re <Y, C T_s P_r> + <C^2, |P_r|^2>`` (sums weighted by the Hermitian weights),
so the errors of all images x shifts x rotations are two matrix products. That makes an
exhaustive search over a few thousand rotations cheap at low resolution, and the posterior
weighted back-projection (the M step) is again two matrix products plus the insertion of one
slice per rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..physics.backprojection import insert_slices
from ..physics.fft import fft3_c, ifft3_c
from ..physics.grids import radius_grid_3d
from ..physics.masks import spherical_mask
from ..physics.projection import sample_volume, slice_coords
from ..physics.rotations import random_rotations
from ..physics.shifts import phase_shift

#: Posterior probabilities below this are set to exactly zero. Softmax of sharply peaked logits
#: otherwise underflows into denormal floats (below 1.2e-38), and matrix products with denormal
#: operands run several times slower on some CPUs (microcode assists); nothing that matters
#: depends on probabilities this small.
POSTERIOR_FLOOR = 1e-30


def posterior(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with every probability below :data:`POSTERIOR_FLOOR` set to 0.

    The logits are floored *before* the exponential (at ``max + log(POSTERIOR_FLOOR)``), so no
    denormal float is ever formed: a kept term is at least ``POSTERIOR_FLOOR / K`` after
    normalisation over ``K`` entries, far above the smallest normal float for any grid size.

    Parameters
    ----------
    logits : (..., K) real.

    Returns
    -------
    (..., K) probabilities summing to 1 over the last axis, exact zeros or >= 1e-30 / K.
    """
    top = logits.max(dim=-1, keepdim=True).values
    logits = logits.masked_fill(logits < top + math.log(POSTERIOR_FLOOR), float("-inf"))
    return torch.softmax(logits, dim=-1)


def shift_grid(max_shift_px: float, step_px: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Square grid of 2D shifts (S, 2) in pixels within a disk of radius ``max_shift_px``."""
    k = int(math.floor(max_shift_px / step_px + 1e-9))
    r = torch.arange(-k, k + 1, device=device, dtype=dtype) * step_px
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return pts[pts.norm(dim=-1) <= max_shift_px + 1e-6]


@dataclass
class SearchData:
    """Image coefficients on a set of half-plane frequencies (P of them)."""

    spectra: torch.Tensor  # (B, P) complex, images' coefficients
    ctf: torch.Tensor  # (B, P) real
    weight: torch.Tensor  # (P,) Hermitian weights
    coords_px: torch.Tensor  # (P, 2) frequency pixels
    freqs_px: torch.Tensor  # (P, 2) cycles per pixel (for shifts in pixels)


def score_grid(data: SearchData, projections: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Squared errors (B, S, M) of every image against every shifted projection.

    projections : (M, P) complex; shifts_px : (S, 2).
    """
    y, c, w = data.spectra, data.ctf, data.weight
    phases = phase_shift(data.freqs_px, shifts_px)  # (S, P)
    z = (y.conj() * c * w)[:, None, :] * phases[None]  # (B, S, P)
    b, s, p = z.shape
    cross = z.real.reshape(b * s, p) @ projections.real.T - z.imag.reshape(b * s, p) @ projections.imag.T
    norm = (c * c * w) @ (projections.abs() ** 2).T  # (B, M)
    y2 = ((y.abs() ** 2) * w).sum(-1)  # (B,)
    return y2[:, None, None] - 2 * cross.reshape(b, s, -1) + norm[:, None, :]


def local_rotations(n: int, max_angle_rad: float, *, generator=None, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """``n`` rotations within roughly ``max_angle_rad`` of the identity (the first is the identity)."""
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = max_angle_rad * torch.rand(n, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
    v = axis * angle
    theta = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = v / theta
    kx = torch.zeros(n, 3, 3, dtype=torch.float64)
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    kx = kx - kx.transpose(1, 2)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    r = eye + s * kx + (1 - c) * (kx @ kx)
    r[0] = torch.eye(3, dtype=torch.float64)
    return r.to(device=device, dtype=dtype)


def regularised_volume(numerator: torch.Tensor, denominator: torch.Tensor, *, radius_px: float,
                       mask_radius_px: float, reg_fraction: float = 0.01) -> torch.Tensor:
    """Fourier volume from back-projected sums: ``num / (den + lambda)``, band-limited to
    ``radius_px``, then masked in real space by a soft sphere. Returns (N, N, N) complex."""
    n = numerator.shape[-1]
    r = radius_grid_3d(n, device=numerator.device, dtype=denominator.dtype)
    inside = r <= radius_px
    lam = reg_fraction * denominator[inside].mean().clamp_min(1e-12)
    f = torch.where(inside, numerator / (denominator + lam), torch.zeros_like(numerator))
    vol = ifft3_c(f).real * spherical_mask(n, mask_radius_px, soft_edge_px=4, device=f.device,
                                           dtype=f.real.dtype)
    f = fft3_c(vol)
    return torch.where(inside, f, torch.zeros_like(f))


class ExpectationMaximisation:
    """Stochastic EM over a rotation grid x shift grid at low resolution, with frequency marching.

    Parameters
    ----------
    coords_px : (P, 2) frequency pixels of the caller's kept (half-plane) coefficients.
    weight : (P,) their Hermitian weights.
    box_px : N.
    n_rotations : size of the SO(3) grid.
    max_shift_px, shift_step_px : the shift grid (a disk), pixels.
    mask_radius_px : radius of the real-space mask applied to each map.
    generator : torch Generator for the random initial poses and local perturbations.
    """

    def __init__(self, coords_px: torch.Tensor, weight: torch.Tensor, box_px: int, *,
                 n_rotations: int = 4608, max_shift_px: float = 6.0, shift_step_px: float = 1.5,
                 mask_radius_px: float | None = None, generator: torch.Generator | None = None):
        from ..physics.rotations import so3_grid

        self.n = box_px
        self.coords_px = coords_px
        self.radius = coords_px.norm(dim=-1)
        self.weight = weight
        self.device = coords_px.device
        self.grid = so3_grid(n_rotations, device=self.device)
        self.grid_step_rad = (8 * math.pi**2 / len(self.grid)) ** (1 / 3)
        self.shifts = shift_grid(max_shift_px, shift_step_px, device=self.device)
        self.mask_radius_px = mask_radius_px if mask_radius_px is not None else 0.45 * box_px
        self.generator = generator
        self.fvol: torch.Tensor | None = None

    def _band(self, radius_px: float) -> torch.Tensor:
        return self.radius <= radius_px

    def _data(self, spectra, ctf, keep) -> SearchData:
        coords = self.coords_px[keep]
        return SearchData(spectra[:, keep], ctf[:, keep], self.weight[keep], coords, coords / self.n)

    def initialise(self, spectra: torch.Tensor, ctf: torch.Tensor, radius_px: float) -> None:
        """Initial volume: back-projection of the images at random poses (a blob of the right size)."""
        keep = self._band(radius_px)
        d = self._data(spectra, ctf, keep)
        rot = random_rotations(len(spectra), generator=self.generator, device=self.device)
        pts = slice_coords(rot, d.coords_px)
        num, den = insert_slices(d.spectra * d.ctf, d.ctf**2, pts, self.n)
        self.fvol = regularised_volume(num, den, radius_px=radius_px, mask_radius_px=self.mask_radius_px)

    @torch.no_grad()
    def iterate(self, spectra: torch.Tensor, ctf: torch.Tensor, radius_px: float, *,
                temperature: float = 1.0, chunk: int = 128, ema: float = 0.0) -> dict:
        """One EM iteration (E: posterior over grid x shifts; M: weighted back-projection).

        Returns the best rotation (B, 3, 3), shift (B, 2) px and posterior maximum per image.
        """
        keep = self._band(radius_px)
        d_all = self._data(spectra, ctf, keep)
        proj = sample_volume(self.fvol, slice_coords(self.grid, d_all.coords_px))  # (M, P)
        m, p = proj.shape
        num_slices = torch.zeros(m, p, dtype=proj.dtype, device=self.device)
        den_slices = torch.zeros(m, p, dtype=proj.real.dtype, device=self.device)
        best_r, best_s, best_p, errs = [], [], [], []
        phases = phase_shift(d_all.freqs_px, self.shifts)  # (S, P)
        # Noise variance per coefficient, from the best fit of a first chunk (model mismatch for
        # noise-free data); the temperature anneals the posterior.
        sigma2 = None
        for start in range(0, len(spectra), chunk):
            y = d_all.spectra[start:start + chunk]
            c = d_all.ctf[start:start + chunk]
            d = SearchData(y, c, d_all.weight, d_all.coords_px, d_all.freqs_px)
            err = score_grid(d, proj, self.shifts)  # (B, S, M)
            b, s, _ = err.shape
            flat = err.reshape(b, -1)
            emin, arg = flat.min(dim=-1)
            if sigma2 is None:
                sigma2 = float(emin.mean() / d_all.weight.sum().clamp_min(1)) + 1e-12
            logits = -(flat - emin[:, None]) / (2 * sigma2 * temperature)
            post = posterior(logits).reshape(b, s, m)
            best_p.append(post.reshape(b, -1).max(dim=-1).values)
            best_r.append(arg % m)
            best_s.append(arg // m)
            errs.append(emin)
            # M step sums: X_bs = C Y conj(T_s); A_r = sum_{b,s} post * X_bs; D_r = sum_b post_b C^2.
            x = (c * y)[:, None, :] * phases.conj()[None]  # (B, S, P)
            pt = post.reshape(b * s, m).T  # (M, B*S)
            xr = x.reshape(b * s, p)
            num_slices += torch.complex(pt @ xr.real, pt @ xr.imag)
            den_slices += post.sum(1).T @ (c * c)
        pts = slice_coords(self.grid, d_all.coords_px)
        num, den = insert_slices(num_slices, den_slices, pts, self.n)
        if ema > 0 and getattr(self, "num", None) is not None:
            # Stochastic EM: decayed running sums over mini-batches.
            num, den = ema * self.num + num, ema * self.den + den
        self.num, self.den = num, den
        self.fvol = regularised_volume(num, den, radius_px=radius_px, mask_radius_px=self.mask_radius_px)
        idx_r = torch.cat(best_r)
        return {"rotations": self.grid[idx_r], "shifts_px": self.shifts[torch.cat(best_s)],
                "posterior_max": torch.cat(best_p), "error": torch.cat(errs), "sigma2": sigma2}

    @torch.no_grad()
    def refine_local(self, spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                     shifts_px: torch.Tensor, radius_px: float, *, n_candidates: int = 64,
                     max_angle_rad: float | None = None, shift_step_px: float = 0.5,
                     chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Local search: each image's best of ``n_candidates`` rotations within ``max_angle_rad``
        of its current one (the current one included) times a 3x3 grid of shifts around its
        current shift (``shift_step_px`` apart). Returns rotations (B, 3, 3) and shifts (B, 2) px."""
        keep = self._band(radius_px)
        d_all = self._data(spectra, ctf, keep)
        if max_angle_rad is None:
            max_angle_rad = self.grid_step_rad
        pert = local_rotations(n_candidates, max_angle_rad, generator=self.generator,
                               device=self.device)
        local_shift = shift_grid(shift_step_px * 1.01, shift_step_px, device=self.device)  # 3x3 or 5 pts
        out_r, out_s = [], []
        for start in range(0, len(spectra), chunk):
            y = d_all.spectra[start:start + chunk]
            c = d_all.ctf[start:start + chunk]
            r0 = rotations[start:start + chunk]
            s0 = shifts_px[start:start + chunk]
            b = len(y)
            cand = r0[:, None] @ pert[None]  # (B, K, 3, 3)
            proj = sample_volume(self.fvol, slice_coords(cand.reshape(-1, 3, 3), d_all.coords_px))
            proj = proj.reshape(b, n_candidates, -1)  # (B, K, P)
            sh = s0[:, None, :] + local_shift[None]  # (B, S, 2)
            ph = phase_shift(d_all.freqs_px, sh.reshape(-1, 2)).reshape(b, -1, proj.shape[-1])
            pred = c[:, None, None, :] * proj[:, None] * ph[:, :, None]  # (B, S, K, P)
            err = ((y[:, None, None] - pred).abs() ** 2 * d_all.weight).sum(-1).reshape(b, -1)
            arg = err.argmin(dim=-1)
            k = arg % n_candidates
            si = arg // n_candidates
            ar = torch.arange(b, device=self.device)
            out_r.append(cand[ar, k])
            out_s.append(sh[ar, si])
        return torch.cat(out_r), torch.cat(out_s)


__all__ = ["ExpectationMaximisation", "SearchData", "local_rotations", "regularised_volume",
           "score_grid", "shift_grid"]
