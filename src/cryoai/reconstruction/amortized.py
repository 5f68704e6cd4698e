"""Poses of particles against a fixed map, at a constant cost per particle.

Two ways to the first guess of each particle's pose, then the same polish:

- **amortized** (cryoAI's idea, as production tools use it: cryoPARES): a trained
  :class:`cryoai.models.encoder.PoseGridEncoder` reads the particle's low-pass, phase-flipped
  image and gives its K most probable rotations of the SO(3) grid; each is scored against the
  map over the shift grid and the best one is kept. Cost: one forward pass and K x S scores;
- **global**: every rotation of the grid is scored; by default in two passes
  (:func:`cryoai.reconstruction.em.assign_pruned`: all rotations in 0.7x the band over
  shifts 1/0.7 further apart, then each particle's best 64 in the full band over the full
  shift grid), or
  exhaustively, every rotation times every shift (the search's assignment,
  :func:`cryoai.reconstruction.em.assign_global`; ``prune_keep=0``). The particles the encoder
  is not sure of get it too;

then local refinement rounds with halving steps and a widening band: Newton steps on a
quadratic model of each particle's error (:func:`cryoai.reconstruction.em.refine_newton`, the
default), or the best of random candidates in a shrinking range
(:func:`cryoai.reconstruction.em.refine_local`). The map never changes, so the poses are in its
frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.encoder import PoseGridEncoder
from ..models.image_formation import ImageFormation
from ..physics.grids import max_paired_radius_px
from ..physics.projection import sample_volume, slice_coords
from ..physics.rotations import so3_grid
from ..physics.symmetry import asymmetric_unit
from .em import (
    PrunedGrid,
    SearchData,
    Workspace,
    assign_global,
    assign_pruned,
    refine_local,
    refine_newton,
    score_hypotheses,
    shift_grid,
)


@dataclass
class AssignSettings:
    """How particles are posed against a fixed map.

    Attributes
    ----------
    radius_px : the band of the first guess (global scores, hypothesis scores), frequency px.
    max_shift_px, shift_step_px : the shift grid of the first guess (a disk), pixels.
    n_rotations : the SO(3) grid of the global first guess.
    hypotheses : the encoder's rotations scored per particle (K).
    prune_keep : the global first guess keeps this many rotations of each particle from its
        coarse pass (:func:`cryoai.reconstruction.em.assign_pruned`); 0: exhaustive
        (:func:`cryoai.reconstruction.em.assign_global`).
    prune_radius_frac : the coarse pass's band, fraction of ``radius_px``. Its shifts are
        spaced ``shift_step_px / prune_radius_frac`` apart, so that its largest phase error
        (band x shift error) is the full pass's.
    refine_method : ``"newton"`` (:func:`cryoai.reconstruction.em.refine_newton`: steps of half
        ``refine_start_deg`` and half ``shift_step_px``, halved each round) or ``"random"``
        (:func:`cryoai.reconstruction.em.refine_local`: ``refine_candidates`` rotations within
        ``refine_start_deg``, x0.55 per round).
    refine_rounds : local refinement rounds after the first guess.
    refine_candidates : local rotations tried per particle and round (``"random"``).
    refine_radius_frac : final refinement band, fraction of the largest paired radius.
    refine_start_deg : the first guess's angular spacing (the SO(3) grid's), degrees.
    refine_band_start_frac : the first Newton round's band, fraction of ``radius_px`` (the
        rounds' bands then rise linearly to the final one: :meth:`PoseAssigner.refine_radius_px`).
    seed : the local perturbations' generator.
    """

    radius_px: float = 10.0
    max_shift_px: float = 6.0
    shift_step_px: float = 2.0
    n_rotations: int = 4608
    hypotheses: int = 32
    prune_keep: int = 64
    prune_radius_frac: float = 0.7
    refine_method: str = "newton"
    refine_rounds: int = 4
    refine_candidates: int = 16
    refine_radius_frac: float = 0.45
    refine_start_deg: float = 14.8
    refine_band_start_frac: float = 0.8
    seed: int = 0


def encoder_images(formation: ImageFormation, spectra: torch.Tensor, ctf: torch.Tensor,
                   encoder: PoseGridEncoder) -> torch.Tensor:
    """The encoder's view of particles: their phase-flipped spectra (times the CTF's sign, so
    that contrast no longer alternates between CTF lobes) within its band, as low-pass images.

    Parameters
    ----------
    formation : the coefficient layout.
    spectra, ctf : (B, M) the particles' coefficients and CTFs.
    encoder : the encoder (its image size and band).

    Returns
    -------
    (B, input_px, input_px) real images.
    """
    flipped = spectra * torch.sign(ctf)
    if encoder.band_px is not None:
        flipped = flipped * formation.band(encoder.band_px)
    return formation.low_pass_images(flipped, encoder.input_px)


class PoseAssigner:
    """Poses of particles against a fixed map: a first guess (the encoder's hypotheses, or the
    whole grid), then local refinement (see the module docstring).

    Parameters
    ----------
    formation : the coefficient layout.
    fourier_volume : (N, N, N) complex map, 1/N scale.
    settings : the grids, hypotheses and refinement schedule.
    encoder : the trained encoder, or None for the global first guess.
    min_confidence : particles whose K hypotheses hold less than this share of the encoder's
        probability get the global first guess instead (the encoder stage calibrates it on
        held-out particles: :func:`cryoai.training.encoder_fit.check_pose_encoder`); 0: none.
    symmetry : (G, 3, 3) the map's point group, or None: the global first guess then scores
        only the grid's rotations in one asymmetric unit (and a grid spacing around it:
        :func:`cryoai.physics.symmetry.asymmetric_unit`), about ``1/G`` of the grid; each pose is
        found up to the group.

    Attributes
    ----------
    counts : how many particles got each first guess so far (``"amortized"``, ``"global"``).
    """

    def __init__(self, formation: ImageFormation, fourier_volume: torch.Tensor, settings: AssignSettings,
                 encoder: PoseGridEncoder | None = None, min_confidence: float = 0.0,
                 symmetry: torch.Tensor | None = None):
        self.formation = formation
        self.min_confidence = float(min_confidence)
        self.counts = {"amortized": 0, "global": 0}
        self.volume = fourier_volume
        self.settings = settings
        self.encoder = encoder.eval() if encoder is not None else None
        self.device = fourier_volume.device
        self.r_max = max_paired_radius_px(formation.box_px)
        self.radius_px = min(settings.radius_px, self.r_max)
        self.shifts = shift_grid(settings.max_shift_px, settings.shift_step_px, device=self.device)
        self.generator = torch.Generator().manual_seed(settings.seed + 4242)
        self.workspace = Workspace()
        if encoder is not None:
            self.grid = encoder.grid.to(self.device)
        else:
            self.grid = so3_grid(settings.n_rotations, device=self.device)
            if symmetry is not None and len(symmetry) > 1:
                spacing_rad = (8 * math.pi**2 / len(self.grid)) ** (1 / 3)
                self.grid = self.grid[asymmetric_unit(self.grid, symmetry, spacing_rad)]
        # The grid's projections in the first guess's band, made once.
        band = formation.band(self.radius_px)
        self.grid_projections = sample_volume(fourier_volume,
                                              slice_coords(self.grid, formation.coords_px[band]))
        self.pruned = None
        if settings.prune_keep > 0:
            self.pruned = PrunedGrid.make(formation, fourier_volume, self.grid,
                                          settings.prune_radius_frac * self.radius_px, settings.max_shift_px,
                                          settings.shift_step_px / settings.prune_radius_frac,
                                          settings.prune_keep)

    @property
    def mode(self) -> str:
        """``"amortized"`` (encoder hypotheses) or ``"global"`` (the whole grid)."""
        return "global" if self.encoder is None else "amortized"

    @torch.no_grad()
    def first_guess(self, spectra: torch.Tensor, ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best rotation and shift (pixels) of each particle before refinement, (B, 3, 3), (B, 2)."""
        if self.encoder is None:
            self.counts["global"] += len(spectra)
            return self._global(spectra, ctf)
        idx, prob = self.hypotheses(spectra, ctf)
        data = SearchData.in_band(self.formation, spectra, ctf, self.radius_px)
        err = score_hypotheses(data, self.grid_projections[idx], self.shifts)  # (B, S, K)
        b, _, k = err.shape
        arg = err.reshape(b, -1).argmin(dim=-1)
        best = idx[torch.arange(b, device=idx.device), arg % k]
        rotations, shifts_px = self.grid[best], self.shifts[arg // k]
        unsure = (prob.sum(dim=-1) < self.min_confidence).nonzero().flatten()
        if len(unsure):
            rotations[unsure], shifts_px[unsure] = self._global(spectra[unsure], ctf[unsure])
        self.counts["global"] += len(unsure)
        self.counts["amortized"] += b - len(unsure)
        return rotations, shifts_px

    def _global(self, spectra: torch.Tensor, ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pruned is not None:
            return assign_pruned(self.formation, spectra, ctf, self.radius_px, self.grid, self.shifts,
                                 self.grid_projections, self.pruned, workspace=self.workspace)
        return assign_global(self.formation, self.volume, spectra, ctf, self.radius_px, self.grid,
                             self.shifts, workspace=self.workspace, projections=self.grid_projections)

    @torch.no_grad()
    def hypotheses(self, spectra: torch.Tensor, ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's K most probable rotations: indices (B, K) into the grid, and their
        probabilities (B, K).
        """
        images = encoder_images(self.formation, spectra, ctf, self.encoder)
        return self.encoder.hypotheses(images, self.settings.hypotheses)

    @torch.no_grad()
    def refine(self, spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
               shifts_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local refinement rounds from ``rotations`` (B, 3, 3) and ``shifts_px`` (B, 2)."""
        st = self.settings
        r_end = max(self.radius_px, min(st.refine_radius_frac * self.r_max, self.r_max))
        newton = st.refine_method == "newton"
        angle = math.radians(st.refine_start_deg) / (2 if newton else 1)
        shift_step = st.shift_step_px / 2
        for k in range(st.refine_rounds):
            r = self.refine_radius_px(k, r_end)
            if newton:
                rotations, shifts_px = refine_newton(
                    self.formation, self.volume, spectra, ctf, rotations, shifts_px, r, step_rad=angle,
                    shift_step_px=shift_step)
                angle, shift_step = angle / 2, shift_step / 2
            else:
                rotations, shifts_px = refine_local(
                    self.formation, self.volume, spectra, ctf, rotations, shifts_px, r, max_angle_rad=angle,
                    n_candidates=st.refine_candidates, shift_step_px=shift_step, generator=self.generator,
                    chunk=128)
                angle = max(angle * 0.55, math.radians(0.5))
                shift_step = max(shift_step * 0.7, 0.1)
        return rotations, shifts_px

    def refine_radius_px(self, k: int, r_end: float) -> float:
        """The band of refinement round ``k`` (0-based), frequency px, rising to ``r_end``.

        Newton rounds start at ``refine_band_start_frac`` of the first guess's band and rise
        linearly to ``r_end``: a round's step halves each time, and a coarse step gains nothing
        from fine detail (at L=64, 4 rounds over 8, 10, 12, 14 px cost 17% less than over 11,
        12, 13, 14 px, at the same median error: 1.68 against 1.67 deg at -10 dB, 1.04 against
        1.05 deg noise-free; docs/benchmarks.md). The random candidates' rounds rise from the
        first guess's band, one step per round.
        """
        st = self.settings
        if st.refine_method != "newton":
            return self.radius_px + (r_end - self.radius_px) * (k + 1) / st.refine_rounds
        start = min(st.refine_band_start_frac * self.radius_px, r_end)
        if st.refine_rounds < 2:
            return r_end
        return start + (r_end - start) * k / (st.refine_rounds - 1)

    #: Particles posed at a time by :meth:`assign`. The first guess's temporaries (the encoder's
    #: activations and logits, the scores) grow with the block: 4,096 at a time ran 1.3x slower
    #: than 1,024 (fresh memory each time, measured 837 against 1,111 img/s end to end).
    BLOCK = 1024

    def assign(self, spectra: torch.Tensor, ctf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses of particles (B, M): rotations (B, 3, 3) and shifts (B, 2) pixels."""
        rotations, shifts_px = [], []
        for start in range(0, len(spectra), self.BLOCK):
            y, c = spectra[start:start + self.BLOCK], ctf[start:start + self.BLOCK]
            rot, sh = self.first_guess(y, c)
            rot, sh = self.refine(y, c, rot, sh)
            rotations.append(rot)
            shifts_px.append(sh)
        return torch.cat(rotations), torch.cat(shifts_px)


__all__ = ["AssignSettings", "PoseAssigner", "encoder_images"]
