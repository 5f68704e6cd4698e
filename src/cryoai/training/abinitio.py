"""Ab initio poses by a coarse-to-fine search (the default warm start of ``cryoai train``).

Stages (all on a fixed-size random subset of the particles, so their cost does not grow with
the data set):

1. Stochastic expectation-maximisation over a near-uniform SO(3) grid x a shift grid, at low
   resolution, with frequency marching (radius from ``search_radius_start`` to
   ``search_radius_end`` cycles per box). The first map is a back-projection at random poses
   (a blob of the right size). Each iteration uses a mini-batch; the back-projected sums are
   decayed running averages.
2. Local refinement: each image's best pose among random perturbations of its current pose
   (shrinking angular range) and a local shift grid, while the band widens; a hard
   back-projection after each round.
3. The remaining particles (if any) are assigned by a global search against the final map,
   followed by the same local refinement; the subset's map is kept fixed, so per-particle cost
   is constant.

The caller then trains the decoder (and optionally the encoder) with these poses.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..physics.backprojection import insert_slices
from ..physics.fft import ifft3_c
from ..physics.projection import sample_volume, slice_coords
from ..physics.shifts import phase_shift
from .search import ExpectationMaximisation, SearchData, regularised_volume, score_grid


@torch.no_grad()
def spectra_of(model, dataset, indices: np.ndarray, device, batch_size: int = 256):
    """Kept coefficients (B, M) and CTF (B, M) of the particles ``indices``."""
    ys, cs = [], []
    for start in range(0, len(indices), batch_size):
        batch = dataset.__getitems__(indices[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        ys.append(model.image_spectra(batch["images"]))
        cs.append(model.ctf(batch))
    return torch.cat(ys), torch.cat(cs)


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """Centre of mass (x, y, z) in px from the box centre of the positive part of a volume."""
    from ..physics.grids import grid_3d

    w = volume.clamp_min(0)
    g = grid_3d(volume.shape[-1], device=volume.device, dtype=volume.dtype)
    return (g * w[..., None]).sum(dim=(0, 1, 2)) / w.sum().clamp_min(1e-12)


class PoseSearch:
    """Runs the search stages of :mod:`cryoai.training.abinitio` for a Trainer's data.

    Parameters
    ----------
    model : a :class:`cryoai.models.cryoai.CryoAI` (only its coefficient layout and CTF are used).
    dataset : the :class:`cryoai.data.dataset.ParticleDataset`.
    cfg : the :class:`cryoai.training.config.TrainConfig`.
    device : torch device.
    log : callable(str) for progress lines.
    """

    def __init__(self, model, dataset, cfg, device, log=print):
        self.model = model
        self.dataset = dataset
        self.cfg = cfg
        self.device = device
        self.log = log
        self.n = model.box_px
        self.nyquist = self.n // 2 - 1
        self.gen = torch.Generator().manual_seed(cfg.seed + 12345)
        max_shift_px = cfg.search_max_shift_px
        if max_shift_px is None:
            max_shift_px = 0.12 * self.n
        self.em = ExpectationMaximisation(
            model.coords_2d, model.hermitian_weight, self.n, n_rotations=cfg.search_rotations,
            max_shift_px=max_shift_px, shift_step_px=cfg.search_shift_step_px,
            mask_radius_px=cfg.mask_radius_frac * self.n if cfg.mask_radius_frac > 0 else 0.45 * self.n,
            generator=self.gen)

    def _radius(self, r: float) -> float:
        return float(min(r, self.nyquist))

    def _hard_backprojection(self, y, c, rot, shifts_px, radius):
        keep = self.em._band(radius)
        coords = self.model.coords_2d[keep]
        x = (c[:, keep] * y[:, keep]) * phase_shift(coords / self.n, shifts_px).conj()
        num, den = insert_slices(x, c[:, keep] ** 2, slice_coords(rot, coords), self.n)
        self.em.fvol = regularised_volume(num, den, radius_px=radius, mask_radius_px=self.em.mask_radius_px)

    def run(self, deadline: float | None = None) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        n_total = len(self.dataset)
        rng = np.random.default_rng(cfg.seed)
        n_sub = min(cfg.search_subset, n_total)
        subset = np.sort(rng.choice(n_total, size=n_sub, replace=False))
        y, c = spectra_of(self.model, self.dataset, subset, self.device)
        r0 = self._radius(cfg.search_radius_start)
        r1 = self._radius(cfg.search_radius_end)
        em = self.em
        em.initialise(y[: cfg.search_batch], c[: cfg.search_batch], r0)
        n_it = cfg.search_iterations
        out = None
        for it in range(n_it):
            r = r0 + (r1 - r0) * min(1.0, it / max(1, int(0.7 * n_it)))
            idx = torch.randperm(n_sub, generator=self.gen)[: cfg.search_batch].to(self.device)
            out = em.iterate(y[idx], c[idx], r, ema=cfg.search_ema)
            post = float(out["posterior_max"].mean())
            converged = r >= r1 and post >= cfg.search_stop_posterior
            if (it + 1) % 10 == 0 or it == n_it - 1 or converged:
                self.log(f"search EM {it + 1}/{n_it}: radius {r:.1f} px, mean max posterior "
                         f"{post:.2f}, {time.perf_counter() - t0:.0f} s")
            if converged:
                break
        # Assign every subset image on the final low-resolution map, then refine locally.
        rot, shifts = self.global_assign(y, c, r1)
        rot, shifts = self.refine(y, c, rot, shifts, start_radius=r1, update_map=True)
        rotations = np.zeros((n_total, 3, 3))
        shifts_px = np.zeros((n_total, 2))
        rotations[subset] = rot.double().cpu().numpy()
        shifts_px[subset] = shifts.double().cpu().numpy()
        rest = np.setdiff1d(np.arange(n_total), subset)
        for start in range(0, len(rest), 4096):
            part = rest[start:start + 4096]
            yp, cp = spectra_of(self.model, self.dataset, part, self.device)
            rp, sp = self.global_assign(yp, cp, r1)
            rp, sp = self.refine(yp, cp, rp, sp, start_radius=r1, update_map=False)
            rotations[part] = rp.double().cpu().numpy()
            shifts_px[part] = sp.double().cpu().numpy()
            self.log(f"search: assigned {min(start + 4096, len(rest))}/{len(rest)} remaining particles")
        volume = ifft3_c(em.fvol).real
        # Centre the map on its centre of mass d (px) and move the shifts to match:
        # projections of V are projections of the centred map shifted by (R^T d)_xy.
        d = centre_of_mass(volume)
        shifts_px += (np.einsum("nji,j->ni", rotations, d.double().cpu().numpy()))[:, :2]
        volume = torch.roll(volume, shifts=tuple(-int(round(float(v))) for v in d.flip(0)), dims=(0, 1, 2))
        self.log(f"search done in {time.perf_counter() - t0:.0f} s "
                 f"(map centred by {d.cpu().numpy().round(2)} px)")
        return {"rotations": rotations, "shifts_a": shifts_px * self.model.pixel_size_a,
                "volume": volume.cpu().numpy(), "subset": subset,
                "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def global_assign(self, y, c, radius, chunk: int = 128):
        """Best grid rotation and shift of each image against the current map (E step only)."""
        em = self.em
        keep = em._band(radius)
        coords = self.model.coords_2d[keep]
        proj = sample_volume(em.fvol, slice_coords(em.grid, coords))
        rots, shs = [], []
        for start in range(0, len(y), chunk):
            d = SearchData(y[start:start + chunk, keep], c[start:start + chunk, keep],
                           self.model.hermitian_weight[keep], coords, coords / self.n)
            err = score_grid(d, proj, em.shifts).reshape(len(d.spectra), -1)
            arg = err.argmin(dim=-1)
            rots.append(em.grid[arg % len(em.grid)])
            shs.append(em.shifts[arg // len(em.grid)])
        return torch.cat(rots), torch.cat(shs)

    def refine(self, y, c, rot, shifts, *, start_radius: float, update_map: bool):
        """Local refinement rounds with a widening band and a shrinking angular range."""
        cfg = self.cfg
        em = self.em
        r_end = self._radius(cfg.refine_radius_frac * self.nyquist)
        rounds = cfg.refine_rounds
        angle = em.grid_step_rad
        shift_step = cfg.search_shift_step_px / 2
        for k in range(rounds):
            r = start_radius + (r_end - start_radius) * (k + 1) / rounds
            rot, shifts = em.refine_local(y, c, rot, shifts, r, n_candidates=cfg.refine_candidates,
                                          max_angle_rad=angle, shift_step_px=shift_step)
            if update_map:
                self._hard_backprojection(y, c, rot, shifts, r)
            angle = max(angle * 0.6, math.radians(0.5))
            shift_step = max(shift_step * 0.7, 0.1)
        return rot, shifts
