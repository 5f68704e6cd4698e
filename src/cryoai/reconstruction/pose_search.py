"""Ab initio poses by a coarse-to-fine search (the first stage of the default ``cryoai train``).

:func:`search_poses` runs, on a fixed-size random subset of the particles (so its cost does
not grow with the data set):

1. stochastic expectation-maximisation over a near-uniform SO(3) grid x a shift grid at low
   resolution, with frequency marching (band from ``radius_start_px`` to ``radius_end_px``).
   The first map is a back-projection at random poses (a blob of the right size). Each
   iteration uses a mini-batch; the back-projected sums are decayed running averages
   (:class:`cryoai.reconstruction.em.ExpectationMaximisation`);
2. a global assignment of every subset image against the final low-resolution map, then local
   refinement (a shrinking angular range, a finer shift grid and a widening band) with a hard
   back-projection after each round;
3. for the particles outside the subset, the same global assignment and local refinement
   against the subset's final map, which stays fixed (per-particle cost is constant);
4. the map is centred on its centre of mass and every shift moved to match.

The caller reconstructs the map from these poses (:func:`cryoai.reconstruction.reconstruct`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..physics.fft import ifft3_c
from ..physics.grids import grid_3d, max_paired_radius_px
from ..physics.poses import Poses
from ..physics.shifts import phase_shift
from .backproject import backproject
from .em import ExpectationMaximisation, assign_global, refine_local
from .spectra import ParticleSpectra


@dataclass
class SearchSettings:
    """The options of :func:`search_poses` (``cryoai train --search-*``, ``--refine-*``).

    Attributes
    ----------
    mask_radius_px : radius of the soft spherical mask of the maps
        (:func:`cryoai.physics.masks.map_mask_radius_px`).
    subset : particles used by the EM and the map (at most).
    n_rotations : size of the SO(3) grid (4,608: about 15 degrees apart).
    iterations : EM iterations (at most; see ``stop_posterior``).
    batch : images per EM iteration.
    stop_posterior : stop the EM once the band is full and the mean maximum posterior is this.
    ema : decay of the running back-projection sums.
    radius_start_px, radius_end_px : the EM band, cycles per box.
    max_shift_px, shift_step_px : the shift grid (a disk), pixels.
    refine_rounds : local refinement rounds.
    refine_candidates : local rotations tried per image and round.
    refine_radius_frac : final refinement band, fraction of the largest paired radius.
    seed : seeds the subset and every random draw of the search.
    """

    mask_radius_px: float
    subset: int = 5000
    n_rotations: int = 4608
    iterations: int = 100
    batch: int = 500
    stop_posterior: float = 0.9
    ema: float = 0.7
    radius_start_px: float = 5.0
    radius_end_px: float = 10.0
    max_shift_px: float = 6.0
    shift_step_px: float = 2.0
    refine_rounds: int = 8
    refine_candidates: int = 48
    refine_radius_frac: float = 0.7
    seed: int = 0


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(x, y, z)`` in pixels from the box centre of the positive part of a
    (N, N, N) volume.
    """
    w = volume.clamp_min(0)
    g = grid_3d(volume.shape[-1], device=volume.device, dtype=volume.dtype)
    return (g * w[..., None]).sum(dim=(0, 1, 2)) / w.sum().clamp_min(1e-12)


def search_poses(particles: ParticleSpectra, settings: SearchSettings, *,
                 log: Callable[[str], None] = print, deadline: float | None = None) -> Poses:
    """Poses of every particle from the images alone (see the module docstring).

    Parameters
    ----------
    particles : the particles' spectra and CTFs.
    settings : the search's options.
    log : progress lines.
    deadline : a ``time.perf_counter()`` time: past it, the EM stops and the remaining local
        refinement rounds are skipped (every particle still gets its global assignment), and
        the log says so.

    Returns
    -------
    :class:`Poses` of every particle (CPU), shifts in Angstrom, for the map centred on its
    centre of mass.
    """
    return _Search(particles, settings, log, deadline).run()


def assign_poses(particles: ParticleSpectra, fourier_volume: torch.Tensor, settings: SearchSettings, *,
                 block: int = 4096):
    """Poses of particles against a given map: for each, the best rotation of the search's SO(3)
    grid and the best shift of its shift grid, then the search's local refinement rounds (the
    assignment :func:`search_poses` gives the particles outside its subset). The map is not
    changed, so the poses are in its frame; every particle costs the same.

    Parameters
    ----------
    particles : the particles' spectra and CTFs.
    fourier_volume : (N, N, N) complex map in the 1/N scale (e.g. a run's decoder).
    settings : the search's options (grid, shifts, bands, refinement).
    block : particles read and assigned at a time (memory is bounded by it).

    Yields
    ------
    (rotations (b, 3, 3), shifts_a (b, 2)) float32 numpy blocks, in particle order.
    """
    search = _Search(particles, settings, log=lambda message: None)
    search.em.fourier_volume = fourier_volume.to(particles.device)
    for _, rot, shifts_px in search.assign_against_map(np.arange(len(particles)), block=block):
        yield (rot.float().cpu().numpy(),
               (shifts_px * particles.formation.pixel_size_a).float().cpu().numpy())


class _Search:
    """The state of one :func:`search_poses` run: the EM (map and grids) and the generator."""

    def __init__(self, particles: ParticleSpectra, settings: SearchSettings, log, deadline=None):
        self.particles = particles
        self.deadline = deadline
        self.deadline_said = False
        self.formation = particles.formation
        self.settings = settings
        self.log = log
        self.n = self.formation.box_px
        self.r_max = max_paired_radius_px(self.n)
        self.gen = torch.Generator().manual_seed(settings.seed + 12345)
        self.em = ExpectationMaximisation(
            self.formation, n_rotations=settings.n_rotations, max_shift_px=settings.max_shift_px,
            shift_step_px=settings.shift_step_px, mask_radius_px=settings.mask_radius_px,
            generator=self.gen)

    def _radius(self, r: float) -> float:
        return float(min(r, self.r_max))

    def run(self) -> Poses:
        st = self.settings
        t0 = time.perf_counter()
        n_total = len(self.particles)
        rng = np.random.default_rng(st.seed)
        n_sub = min(st.subset, n_total)
        subset = np.sort(rng.choice(n_total, size=n_sub, replace=False))
        y, c = self.particles.read(subset)
        r0, r1 = self._radius(st.radius_start_px), self._radius(st.radius_end_px)
        em = self.em
        em.initialise(y[: st.batch], c[: st.batch], r0)
        for it in range(st.iterations):
            r = r0 + (r1 - r0) * min(1.0, it / max(1, int(0.7 * st.iterations)))
            idx = torch.randperm(n_sub, generator=self.gen)[: st.batch].to(self.particles.device)
            out = em.iterate(y[idx], c[idx], r, ema=st.ema)
            post = float(out["posterior_max"].mean())
            converged = r >= r1 and post >= st.stop_posterior
            if (it + 1) % 10 == 0 or it == st.iterations - 1 or converged:
                self.log(f"search EM {it + 1}/{st.iterations}: radius {r:.1f} px, mean max posterior "
                         f"{post:.2f}, {time.perf_counter() - t0:.0f} s")
            if converged:
                break
            if self._past_deadline(f"EM stopped after {it + 1} iterations"):
                break
        # Assign every subset image on the final low-resolution map, then refine locally.
        rot, shifts = self._assign(y, c, r1)
        rot, shifts = self._refine(y, c, rot, shifts, start_radius=r1, update_map=True)
        rotations = np.zeros((n_total, 3, 3))
        shifts_px = np.zeros((n_total, 2))
        rotations[subset] = rot.double().cpu().numpy()
        shifts_px[subset] = shifts.double().cpu().numpy()
        rest = np.setdiff1d(np.arange(n_total), subset)
        done = 0
        for part, rp, sp in self.assign_against_map(rest):
            rotations[part] = rp.double().cpu().numpy()
            shifts_px[part] = sp.double().cpu().numpy()
            done += len(part)
            self.log(f"search: assigned {done}/{len(rest)} remaining particles")
        volume = ifft3_c(em.fourier_volume).real
        # Centre the map on its centre of mass d (px) and move the shifts to match:
        # projections of V are projections of the centred map shifted by (R^T d)_xy.
        d = centre_of_mass(volume)
        shifts_px += (np.einsum("nji,j->ni", rotations, d.double().cpu().numpy()))[:, :2]
        self.log(f"search done in {time.perf_counter() - t0:.0f} s "
                 f"(map centred by {d.cpu().numpy().round(2)} px)")
        return Poses.from_arrays(rotations, shifts_px * self.formation.pixel_size_a)

    def assign_against_map(self, indices: np.ndarray, block: int = 4096):
        """Global assignment then local refinement of the particles ``indices`` against the
        current map, which stays fixed (constant cost per particle).

        Yields
        ------
        (indices of a block, rotations (b, 3, 3), shifts (b, 2) px) block by block.
        """
        r1 = self._radius(self.settings.radius_end_px)
        for start in range(0, len(indices), block):
            part = indices[start:start + block]
            y, c = self.particles.read(part)
            rot, shifts = self._assign(y, c, r1)
            rot, shifts = self._refine(y, c, rot, shifts, start_radius=r1, update_map=False)
            yield part, rot, shifts

    def _past_deadline(self, what: str) -> bool:
        """Whether the deadline has passed (said once, with what the search cuts short)."""
        if self.deadline is None or time.perf_counter() < self.deadline:
            return False
        if not self.deadline_said:
            self.log(f"search: time limit (--max-minutes) reached: {what}; the search goes on with "
                     "what it has (every particle is still assigned)")
            self.deadline_said = True
        return True

    def _assign(self, y, c, radius):
        return assign_global(self.formation, self.em.fourier_volume, y, c, radius, self.em.grid,
                             self.em.shifts, workspace=self.em.workspace)

    def _hard_backprojection(self, y, c, rot, shifts_px, radius, chunk: int = 512):
        keep = self.formation.band(radius)
        coords, freqs = self.formation.coords_px[keep], self.formation.freqs_px[keep]
        num = den = None
        for start in range(0, len(y), chunk):  # in blocks: bounded temporaries
            rows = slice(start, start + chunk)
            phases = phase_shift(freqs, shifts_px[rows])
            a, b = backproject(y[rows][:, keep], c[rows][:, keep], rot[rows], coords, self.n, phases)
            num, den = (a, b) if num is None else (num + a, den + b)
        self.em.set_map(num, den, radius)

    def _refine(self, y, c, rot, shifts, *, start_radius: float, update_map: bool):
        """Local refinement rounds with a widening band and a shrinking angular range."""
        st = self.settings
        r_end = self._radius(st.refine_radius_frac * self.r_max)
        angle = self.em.grid_step_rad
        shift_step = st.shift_step_px / 2
        for k in range(st.refine_rounds):
            if self._past_deadline(f"local refinement stopped after {k} of {st.refine_rounds} rounds"):
                break
            r = start_radius + (r_end - start_radius) * (k + 1) / st.refine_rounds
            rot, shifts = refine_local(self.formation, self.em.fourier_volume, y, c, rot, shifts, r,
                                       max_angle_rad=angle, n_candidates=st.refine_candidates,
                                       shift_step_px=shift_step, generator=self.gen)
            if update_map:
                self._hard_backprojection(y, c, rot, shifts, r)
            angle = max(angle * 0.6, math.radians(0.5))
            shift_step = max(shift_step * 0.7, 0.1)
        return rot, shifts
