"""3D classification at the run's poses (``cryoai train --classes K``).

K maps are made together from the same particles, each particle assigned to the map that
explains it best, as RELION's 3D classification without alignment does: the poses stay the
run's (one pose search, not K), and only the assignment and the maps change. It separates
conformations or compositions that share one frame, and gathers junk in a class of its own.

Hard EM (each particle in one class at a time, as cryoSPARC's heterogeneous refinement ends):

1. the particles are split at random into K classes;
2. each class's map is the half-map FSC-regularised reconstruction of its particles
   (:func:`cryoai.reconstruction.reconstruct`), so a class of few or inconsistent particles
   gets a weak, blurred map rather than a noisy one;
3. each particle goes to the class whose projection ``p`` at its pose has the highest
   log-likelihood against the whitened image, ``a <y, p> - a^2 ||p||^2 / 2`` (the Gaussian
   likelihood's ratio to noise alone), with ``a`` the particle's micrograph's amplitude (not the
   particle's own: with a free amplitude, empty ice fits every class alike and the classes stay
   random splits; with the micrograph's, the class whose map is weakest explains empty ice best,
   gathers it, and grows weaker: a junk class);
4. a class left with fewer than ``min_particles`` takes half of the largest class's particles
   (those that the largest class explains least), and steps 2-4 repeat until fewer than
   ``stop_fraction`` of the particles change class.

Each particle's probability of its class is the softmax of the log-likelihoods over the classes.
Measured on the large-complex set (3,000 picks, 25% junk) at a run's poses: with K = 2, one class
of 602 held all 315 empty images and all 166 aggregates, and 38 real particles (with the
particle's own amplitude instead, the two classes were random halves); docs/pipeline.md#3d-classes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..physics.fsc import resolution_px
from ..physics.poses import Poses
from ..physics.projection import sample_volume, slice_coords
from ..physics.shifts import phase_shift
from .amortized import AssignSettings, PoseAssigner
from .particle_scores import score_band
from .regularised import Reconstruction, reconstruct
from .spectra import ParticleSpectra


@dataclass
class Classes3DSettings:
    """How :func:`classify_3d` runs.

    Attributes
    ----------
    n_classes : K.
    iterations : at most this many rounds of (maps, assignment).
    min_particles : a class with fewer takes half of the largest class.
    stop_fraction : stop once fewer than this share of the particles change class.
    seed : the random first split and the maps' half sets.
    """

    n_classes: int = 2
    iterations: int = 20
    min_particles: int = 20
    stop_fraction: float = 0.005
    seed: int = 0


@dataclass
class Classes3D:
    """What :func:`classify_3d` found.

    Attributes
    ----------
    rows : (m,) the particles classified (indices into the data set).
    assignment : (m,) int, each one's class, 0..K-1.
    probability : (m,) its posterior probability of that class.
    log_likelihood : (m,) its log-likelihood ratio against its class's map (step 3).
    reconstructions : K :class:`Reconstruction`, each class's map.
    sizes : (K,) particles per class.
    resolution_px : (K,) each class's half-map FSC=0.143 resolution, pixels.
    iterations : rounds run.
    seconds : how long it took.
    """

    rows: np.ndarray
    assignment: np.ndarray
    probability: np.ndarray
    log_likelihood: np.ndarray
    reconstructions: list[Reconstruction]
    sizes: np.ndarray
    resolution_px: np.ndarray
    iterations: int
    seconds: float


@torch.no_grad()
def class_log_likelihoods(particles: ParticleSpectra, maps: list[torch.Tensor], poses: Poses,
                          rows: np.ndarray, amplitude: np.ndarray, radius_px: float) -> np.ndarray:
    """(m, K) log-likelihood ratios ``a <y, p> - a^2 ||p||^2 / 2`` of the particles ``rows``
    against each map at their poses, within ``radius_px`` (whitened units), with ``amplitude``
    (n,) the expected amplitude ``a`` of every particle of the data set.
    """
    formation = particles.formation
    keep = score_band(formation, radius_px)
    weight = formation.hermitian_weight[keep].double()
    out = np.zeros((len(rows), len(maps)))
    position = {int(r): i for i, r in enumerate(rows)}
    for idx, y, c in particles.batches(rows):
        sel = torch.as_tensor(idx)
        at = [position[int(r)] for r in idx]
        a = torch.as_tensor(amplitude[idx], dtype=torch.float64, device=y.device)
        phases = phase_shift(formation.freqs_px[keep],
                             poses.shifts_a[sel].to(y.device) / formation.pixel_size_a)
        coords = slice_coords(poses.rotations[sel].to(y.device), formation.coords_px[keep])
        yk = y[:, keep].cdouble()
        for k, fourier_volume in enumerate(maps):
            p = sample_volume(fourier_volume, coords)
            p = (p * phases * c[:, keep]).cdouble()
            cross = ((yk * p.conj()).real * weight).sum(-1)
            norm2 = ((p.real**2 + p.imag**2) * weight).sum(-1)
            out[at, k] = (a * cross - 0.5 * a * a * norm2).cpu().numpy()
    return out


def _refill_small_classes(assignment: np.ndarray, scores: np.ndarray, min_particles: int) -> np.ndarray:
    """Each class under ``min_particles`` takes the half of the largest class that the latter's
    map explains least (``scores``: (m, K) log-likelihoods; the LBG split).
    """
    assignment = assignment.copy()
    n_classes = scores.shape[1]
    for k in range(n_classes):
        sizes = np.bincount(assignment, minlength=n_classes)
        if sizes[k] >= min_particles:
            continue
        largest = int(np.argmax(sizes))
        members = np.flatnonzero(assignment == largest)
        worst = members[np.argsort(scores[members, largest])[: len(members) // 2]]
        assignment[worst] = k
    return assignment


def _softmax_probability(log_like: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    log_like = log_like - log_like.max(axis=1, keepdims=True)
    post = np.exp(log_like)
    post /= post.sum(axis=1, keepdims=True)
    return post[np.arange(len(assignment)), assignment]


def _classes(rows: np.ndarray, assignment: np.ndarray, scores: np.ndarray, recs: list[Reconstruction],
             iterations: int, t0: float) -> Classes3D:
    """The :class:`Classes3D` of an assignment, its (m, K) log-likelihoods and the K maps."""
    return Classes3D(rows=rows, assignment=assignment, probability=_softmax_probability(scores, assignment),
                     log_likelihood=scores[np.arange(len(rows)), assignment], reconstructions=recs,
                     sizes=np.bincount(assignment, minlength=len(recs)),
                     resolution_px=np.array([resolution_px(r.fsc_halves, 0.143) for r in recs]),
                     iterations=iterations, seconds=time.perf_counter() - t0)


def classify_3d(particles: ParticleSpectra, poses: Poses, rows: np.ndarray, *, amplitude: np.ndarray,
                radius_px: float, mask_radius_px: float, settings: Classes3DSettings | None = None,
                symmetry: torch.Tensor | None = None, log=None) -> Classes3D:
    """K maps and each particle's class at fixed poses (the module docstring).

    Parameters
    ----------
    particles : the particles' whitened spectra and CTFs.
    poses : every particle's pose (CPU).
    rows : the particles to classify.
    amplitude : (n,) each particle's expected amplitude against a map of the data's scale (its
        micrograph's: :func:`cryoai.reconstruction.particle_scores.micrograph_amplitude`).
    radius_px : the band compared, frequency px (where the run's map has signal).
    mask_radius_px : the maps' soft mask.
    settings : :class:`Classes3DSettings`.
    symmetry : (G, 3, 3) the maps' point group (every class shares it), or None (C1).
    log : optional ``log(message)``.
    """
    st = settings or Classes3DSettings()
    t0 = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    k_classes = int(st.n_classes)
    if k_classes < 2 or len(rows) < k_classes * st.min_particles:
        raise ValueError(f"3D classification into {k_classes} classes needs at least "
                         f"{max(k_classes, 2) * st.min_particles} particles (got {len(rows)})")
    rng = np.random.default_rng(st.seed)
    assignment = rng.integers(0, k_classes, len(rows))
    scores = np.zeros((len(rows), k_classes))
    iterations = 0
    for iterations in range(1, st.iterations + 1):
        recs = [reconstruct(particles, poses, mask_radius_px=mask_radius_px, seed=st.seed,
                            indices=rows[assignment == k], symmetry=symmetry) for k in range(k_classes)]
        scores = class_log_likelihoods(particles, [r.fourier_volume for r in recs], poses, rows, amplitude,
                                       radius_px)
        new = _refill_small_classes(np.argmax(scores, axis=1), scores, st.min_particles)
        changed = float(np.mean(new != assignment))
        assignment = new
        if log is not None:
            sizes = np.bincount(assignment, minlength=k_classes)
            log(f"3D classes, round {iterations}: sizes {', '.join(str(int(v)) for v in sizes)}; "
                f"{changed:.1%} changed class")
        if changed < st.stop_fraction:
            break
    recs = [reconstruct(particles, poses, mask_radius_px=mask_radius_px, seed=st.seed,
                        indices=rows[assignment == k], symmetry=symmetry) for k in range(k_classes)]
    scores = class_log_likelihoods(particles, [r.fourier_volume for r in recs], poses, rows, amplitude,
                                   radius_px)
    return _classes(rows, assignment, scores, recs, iterations, t0)


@dataclass
class ClassRefinementSettings:
    """How :func:`refine_classes` runs.

    Attributes
    ----------
    rounds : at most this many rounds of (poses per class, assignment, maps).
    stop_fraction : stop once fewer than this share of the particles change class.
    min_particles : a class with fewer takes half of the largest class.
    seed : the maps' half sets.
    """

    rounds: int = 4
    stop_fraction: float = 0.01
    min_particles: int = 20
    seed: int = 0


@torch.no_grad()
def refine_classes(particles: ParticleSpectra, rows: np.ndarray, maps: list[torch.Tensor], *,
                   assign: AssignSettings, amplitude: np.ndarray, radius_px: float, mask_radius_px: float,
                   settings: ClassRefinementSettings | None = None, symmetry: torch.Tensor | None = None,
                   log=None, progress=None) -> tuple[Classes3D, Poses]:
    """Classes with a pose per class (heterogeneous refinement, as cryoSPARC's): every particle
    is posed against every class's map (the global first guess over the grid, then local
    refinement: :class:`cryoai.reconstruction.PoseAssigner`), goes to the class whose map
    explains it best at its own pose (the log-likelihood of :func:`class_log_likelihoods`), and
    each class's map is made again from its particles at their poses; until fewer than
    ``stop_fraction`` change class. Where :func:`classify_3d` keeps the run's one pose per
    particle, so that particles of another structure stay posed against the wrong map, here each
    class poses its particles in its own frame.

    Parameters
    ----------
    particles : the particles' whitened spectra and CTFs.
    rows : the particles to classify.
    maps : K start maps (Fourier, 1/N scale; e.g. :func:`classify_3d`'s).
    assign : the pose search against each map.
    amplitude, radius_px, mask_radius_px : as :func:`classify_3d`.
    settings : :class:`ClassRefinementSettings`.
    symmetry : the maps' point group, or None.
    log : optional ``log(message)``; progress : optional ``progress(what, done, total)``.

    Returns
    -------
    (:class:`Classes3D`, :class:`Poses` of every particle of the data set: those of ``rows``
    against their class's map, the others identity).
    """
    st = settings or ClassRefinementSettings()
    t0 = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    k_classes, n_total = len(maps), len(particles)
    assignment = np.full(len(rows), -1)
    rotations = np.zeros((n_total, 3, 3), dtype=np.float32)
    shifts_a = np.zeros((n_total, 2), dtype=np.float32)
    scores = np.zeros((len(rows), k_classes))
    recs: list[Reconstruction] = []
    iterations = 0
    for iterations in range(1, st.rounds + 1):
        per_class = []
        for k, fourier_volume in enumerate(maps):
            assigner = PoseAssigner(particles.formation, fourier_volume, assign, symmetry=symmetry)
            rot = np.zeros((n_total, 3, 3), dtype=np.float32)
            sh = np.zeros((n_total, 2), dtype=np.float32)
            for start in range(0, len(rows), 2048):
                block = rows[start:start + 2048]
                y, c = particles.read(block)
                r, s = assigner.assign(y, c)
                rot[block] = r.float().cpu().numpy()
                sh[block] = (s * particles.formation.pixel_size_a).float().cpu().numpy()
                if progress is not None:
                    progress("classes: poses per class", k * len(rows) + start + len(block),
                             k_classes * len(rows))
            poses_k = Poses(torch.from_numpy(rot), torch.from_numpy(sh))
            scores[:, k] = class_log_likelihoods(particles, [fourier_volume], poses_k, rows, amplitude,
                                                 radius_px)[:, 0]
            per_class.append((rot, sh))
        new = _refill_small_classes(np.argmax(scores, axis=1), scores, st.min_particles)
        changed = float(np.mean(new != assignment))
        assignment = new
        for k, (rot, sh) in enumerate(per_class):
            mine = rows[assignment == k]
            rotations[mine], shifts_a[mine] = rot[mine], sh[mine]
        poses = Poses(torch.from_numpy(rotations), torch.from_numpy(shifts_a))
        recs = [reconstruct(particles, poses, mask_radius_px=mask_radius_px, seed=st.seed,
                            indices=rows[assignment == k], symmetry=symmetry) for k in range(k_classes)]
        maps = [r.fourier_volume for r in recs]
        if log is not None:
            sizes = np.bincount(assignment, minlength=k_classes)
            log(f"3D classes with poses, round {iterations}: sizes {', '.join(str(int(v)) for v in sizes)}; "
                f"{changed:.1%} changed class")
        if changed < st.stop_fraction:
            break
    poses = Poses(torch.from_numpy(rotations), torch.from_numpy(shifts_a))
    return _classes(rows, assignment, scores, recs, iterations, t0), poses
