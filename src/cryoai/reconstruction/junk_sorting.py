"""Junk sorting: every particle scored against the map at its pose, the junk called, and the
particles that look like junk given a second look.

A real particle can look like junk at its pose for two reasons the particle is not to blame
for: the pose is wrong (posed against the subset's early map, or picked farther off-centre than
the search's shift range), or the map it is scored against still holds the junk. So the
sorting alternates, ``passes`` times:

1. the map is made again from the particles kept (the junk no longer in it);
2. every particle called junk is posed again against that map by the global search, with a
   wider shift range (``max_shift_frac`` of the box: a particle picked off-centre); it takes
   the new pose when that explains it better (a higher matched-filter score in the same band);
3. every particle is scored again and the junk called again
   (:func:`cryoai.reconstruction.particle_scores.classify_junk`).

The maps of step 1 come from the half sets' back-projected sums of every particle, kept up to
date as poses change, less the sums of the particles called junk: a pass costs in proportion
to the junk and to the particles re-posed, not to the whole set (one back-projection of the
set in all).

Measured on the large-complex set (3,000 picks, 25% junk) at a run's poses: 7% of the real
particles were more than 10 deg from their pose and most were called junk (precision 0.74);
two passes pose two thirds of them right, and the whole runs' calls reach 0.88-0.91 recall at
0.85-0.88 precision on 3 seeds (docs/pipeline.md#junk).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..physics.fsc import resolution_px
from ..physics.grids import max_paired_radius_px
from ..physics.poses import Poses
from .amortized import AssignSettings, PoseAssigner
from .particle_scores import JunkDecision, ParticleScores, classify_junk, score_particles, score_spectra
from .regularised import (
    Reconstruction,
    backproject_particles,
    half_sets,
    reconstruct,
    reconstruction_from_sums,
)
from .shard import ALONE, Shard
from .spectra import ParticleSpectra


@dataclass
class JunkSortSettings:
    """How :func:`sort_junk` calls the junk (every field from the run's options and policy:
    ``cryoai.pipeline.settings``).

    Attributes
    ----------
    threshold : robust distance (cluster standard deviations) beyond which a particle is junk.
    core_share : the share of a Gaussian cluster the fit uses as its core
        (:func:`cryoai.reconstruction.particle_scores.classify_junk`).
    passes : rounds of (map from the kept particles, junk posed again, all scored again); 0:
        one scoring against the given map.
    max_shift_frac : the shift range of the second look, fraction of the box (the search's is
        0.12): particles picked this far off-centre are still found.
    """

    threshold: float
    core_share: float
    passes: int
    max_shift_frac: float


@dataclass
class JunkSorting:
    """What :func:`sort_junk` found.

    Attributes
    ----------
    poses : every particle's pose (those that a second look posed better, changed).
    scores : the last scores (against the kept particles' map, at ``poses``).
    decision : the last call (``decision.keep``).
    reconstruction : the map of the kept particles at ``poses``.
    radius_px : the band scored, frequency px (where the first map has signal).
    reposed : how many particles took a new pose.
    seconds : how long it took.
    """

    poses: Poses
    scores: ParticleScores
    decision: JunkDecision
    reconstruction: Reconstruction
    radius_px: float
    reposed: int
    seconds: float


def score_band_px(rec: Reconstruction) -> float:
    """The band where a map has signal: the radius (frequency px) of its half maps' FSC=0.143,
    at least 4 px, at most the largest paired radius.
    """
    box = rec.fourier_volume.shape[-1]
    return min(max(box / resolution_px(rec.fsc_halves, 0.143), 4.0), float(max_paired_radius_px(box)))


def _half_sums(particles: ParticleSpectra, poses: Poses, rows: np.ndarray, half: np.ndarray,
               symmetry: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The back-projected sums of ``rows`` at ``poses``, one per half set (``half``: (n,) 0 or 1),
    each particle inserted once per operator of ``symmetry`` (None: C1).
    """
    return [backproject_particles(particles, rows[half[rows] == h], poses, symmetry=symmetry) for h in (0, 1)]


@torch.no_grad()
def repose(particles: ParticleSpectra, poses: Poses, rows: np.ndarray, assigner: PoseAssigner,
           radius_px: float) -> np.ndarray:
    """Pose ``rows`` again with ``assigner`` and keep each new pose that explains its particle
    better (a higher matched-filter score within ``radius_px`` against the assigner's map).
    ``poses`` is changed in place; returns the (k,) rows whose pose changed.
    """
    formation = particles.formation
    changed = []
    for idx, y, c in particles.batches(np.asarray(rows, dtype=np.int64)):
        rot_new, shift_new_px = assigner.assign(y, c)
        sel = torch.as_tensor(idx)
        rot_old = poses.rotations[sel].to(y.device)
        shift_old_px = poses.shifts_a[sel].to(y.device) / formation.pixel_size_a
        old = score_spectra(formation, assigner.volume, y, c, rot_old, shift_old_px, radius_px)[0]
        new = score_spectra(formation, assigner.volume, y, c, rot_new, shift_new_px, radius_px)[0]
        better = (new > old).cpu()
        if better.any():
            take = sel[better]
            poses.rotations[take] = rot_new[better.to(rot_new.device)].cpu().to(poses.rotations.dtype)
            poses.shifts_a[take] = (shift_new_px[better.to(shift_new_px.device)].cpu()
                                    * formation.pixel_size_a).to(poses.shifts_a.dtype)
            changed.append(idx[better.numpy()])
    return np.concatenate(changed) if changed else np.zeros(0, dtype=np.int64)


def sort_junk(particles: ParticleSpectra, poses: Poses, rec: Reconstruction, *,
              groups: np.ndarray | None, assign_settings: AssignSettings, mask_radius_px: float,
              settings: JunkSortSettings, seed: int = 0,
              sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              symmetry: torch.Tensor | None = None, shard: Shard = ALONE, log=None,
              progress=None) -> JunkSorting:
    """Score, call the junk, and give the junk a second look (the module docstring).

    Parameters
    ----------
    particles : the particles' whitened spectra and CTFs (the scores are in noise sd).
    poses : every particle's pose (CPU, in ``rec``'s frame); not changed (a copy is returned).
    rec : the map of every particle at ``poses``; its half maps' FSC sets the band.
    groups : (n,) micrograph of each particle, or None.
    assign_settings : how the junk is posed again (the run's assignment settings; the shift
        range is widened to ``settings.max_shift_frac`` of the box and the first guess is global).
    mask_radius_px : the maps' soft mask.
    settings : :class:`JunkSortSettings`.
    seed : the half-set split of the maps.
    sums : the two half sets' back-projected sums of every particle at ``poses``, split by
        ``half_sets(n, seed)`` (:func:`cryoai.reconstruction.regularised.half_set_sums`: those
        ``rec`` was made from), or None: computed here (one more back-projection of every particle).
        They are updated in place as particles change pose (handed over: not the caller's after).
    log : optional ``log(message)``.
    progress : optional ``progress(what, done, total)`` after each pass.
    """
    st = settings
    t0 = time.perf_counter()
    n, box = len(particles), particles.formation.box_px
    poses = Poses(poses.rotations.clone(), poses.shifts_a.clone())
    radius_px = score_band_px(rec)
    scores = score_particles(particles, rec.fourier_volume, poses, radius_px, outer_radius_px=mask_radius_px,
                             shard=shard)
    decision = classify_junk(scores, groups, threshold=st.threshold, core_share=st.core_share)
    reposed: set[int] = set()
    wide = replace(assign_settings, max_shift_px=max(assign_settings.max_shift_px, st.max_shift_frac * box))
    # The half-set sums of every particle at its current pose, kept up to date: a map of the
    # kept particles is then these less the junk's sums, at a cost in proportion to the junk.
    half = np.zeros(n, dtype=np.int64)
    half[half_sets(n, seed)[1]] = 1
    all_sums = None
    if st.passes:
        # (updated in place as particles change pose: ``sums`` are the caller's, handed over)
        all_sums = list(sums) if sums is not None else \
            _half_sums(particles, poses, np.arange(n), half, symmetry)

    def kept_map() -> Reconstruction:
        # every particle's sums less the junk's, made in the junk's own tensors (one set of sums
        # fewer alive: at 256 px each set is 400 MB)
        kept_sums = _half_sums(particles, poses, np.flatnonzero(~decision.keep), half, symmetry)
        for (a_num, a_den), (j_num, j_den) in zip(all_sums, kept_sums, strict=True):
            j_num.neg_().add_(a_num)
            j_den.neg_().add_(a_den)
        return reconstruction_from_sums(kept_sums, mask_radius_px=mask_radius_px)

    for k in range(st.passes):
        junk = np.flatnonzero(~decision.keep)
        if not len(junk) or decision.keep.sum() < 10:
            break
        rec = kept_map()
        assigner = PoseAssigner(particles.formation, rec.fourier_volume, wide, None)
        before = Poses(poses.rotations.clone(), poses.shifts_a.clone())
        changed = repose(particles, poses, junk, assigner, radius_px)
        if len(changed):  # the sums updated in place: the changed particles' old terms out, new in
            for at, sign in ((before, -1.0), (poses, 1.0)):
                for (a_num, a_den), (c_num, c_den) in zip(
                        all_sums, _half_sums(particles, at, changed, half, symmetry), strict=True):
                    a_num.add_(c_num, alpha=sign)
                    a_den.add_(c_den, alpha=sign)
        reposed.update(changed.tolist())
        scores = score_particles(particles, rec.fourier_volume, poses, radius_px, mask_radius_px, shard=shard)
        decision = classify_junk(scores, groups, threshold=st.threshold, core_share=st.core_share)
        if progress is not None:
            progress("junk passes", k + 1, st.passes)
        if log is not None:
            log(f"junk, pass {k + 1}: {len(junk)} called junk were posed again against the kept "
                f"particles' map (shifts up to {wide.max_shift_px:.1f} px), {len(changed)} took a "
                f"better pose; {int((~decision.keep).sum())} now called junk")
    if not decision.keep.all() or reposed:
        rec = kept_map() if all_sums is not None else \
            reconstruct(particles, poses, mask_radius_px=mask_radius_px, seed=seed,
                        indices=np.flatnonzero(decision.keep), symmetry=symmetry)
    return JunkSorting(poses=poses, scores=scores, decision=decision, reconstruction=rec, radius_px=radius_px,
                       reposed=len(reposed), seconds=time.perf_counter() - t0)
