"""Ab initio poses by a coarse-to-fine search: the mechanisms of the default run's search stage.

The default run (:func:`cryoai.pipeline.run_default`) calls :func:`search_subset`,
:func:`repose_subset`, then :func:`assign_remaining`; the search runs on a fixed-size random
subset of the particles (so its cost does not grow with the data set):

1. stochastic expectation-maximisation over a near-uniform SO(3) grid x a shift grid at low
   resolution, with frequency marching (band from ``radius_start_px`` to ``radius_end_px``).
   The first map is a back-projection at random poses (a blob of the right size), a map
   the user gives (:func:`starting_map`: low-passed, and the EM then runs at its final band
   from the start), or a map posed from the subset's 2D class averages
   (:func:`start_from_class_averages`, for images that carry too little signal each to find
   the molecule from a blob). Each iteration uses a mini-batch; the back-projected sums are
   decayed running averages (:class:`cryoai.reconstruction.em.ExpectationMaximisation`);
2. a global assignment of every subset image against the final low-resolution map, then local
   refinement (a shrinking angular range, a finer shift grid and a widening band) with a hard
   back-projection after each round;
2b. every subset image posed afresh against that final map, as the other particles are in step
   3 (a global first guess, then Newton refinement): the refinement rounds of step 2 pose each
   image against a map back-projected from their own poses, and stay near where the EM left
   them (on a 5,000-particle -10 dB set: a median error of 6.8 deg, against 2.1 deg posed
   afresh, in 5 s);
3. for the particles outside the subset, a first guess (the encoder's hypotheses when the run
   trained one, else the same global assignment) and a short local refinement against the
   subset's final map, which stays fixed (per-particle cost is constant:
   :class:`cryoai.reconstruction.amortized.PoseAssigner`);
4. the map is centred on its centre of mass and every shift moved to match.

The caller reconstructs the map from these poses (:func:`cryoai.reconstruction.reconstruct`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..physics.fft import fft3_c, ifft3_c
from ..physics.grids import grid_3d, max_paired_radius_px
from ..physics.poses import Poses
from ..physics.projection import sample_volume, slice_coords
from ..physics.shifts import phase_shift
from .amortized import AssignSettings, PoseAssigner
from .backproject import backproject
from .class_averages import ClassAverages, ClassAverageSettings, class_averages, class_particles
from .em import (
    ExpectationMaximisation,
    SearchData,
    assign_global,
    refine_local,
    refine_newton,
    score_hypotheses,
)
from .particle_scores import score_spectra
from .shard import ALONE, Shard
from .spectra import ParticleSpectra, SpectraInMemory

#: A progress callback: ``progress(what, done, total)`` (e.g. a bar per ``what``).
Progress = Callable[[str, int, int], None]


@dataclass
class SearchSettings:
    """The options of the search (:func:`search_subset`). Every field is given by the caller:
    ``cryoai.pipeline.settings.search_settings`` makes them from the run's options and policy
    (their one source, ``cryoai.training.config.TrainConfig``).

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
    refine_candidates : local rotations tried per image and round (``refine_method="random"``).
    refine_radius_frac : final refinement band, fraction of the largest paired radius.
    class_radius_px : the band of the 2D classification that makes a start from class averages
        (its in-plane first guesses); None: ``radius_end_px``.
    images_per_class, max_classes : the number of 2D classes of that start aims at this many
        images per class, and is at most ``max_classes``.
    class_search_seeds : searches of the class averages' poses from different seeds, the best
        kept (by how much of the averages the map explains).
    seed : seeds the subset and every random draw of the search.
    temperature : of the EM's posterior (1: the noise model's; below 1 sharper).
    n_classes : K maps searched together from K blobs (heterogeneous ab initio; 1: one map).
    refine_method : ``"newton"`` (:func:`cryoai.reconstruction.em.refine_newton`: steps of half
        the grid's spacing and half the shift step, halved each round) or ``"random"``
        (:func:`cryoai.reconstruction.em.refine_local`: ``refine_candidates`` rotations within
        the grid's spacing, x0.6 per round).
    """

    mask_radius_px: float
    subset: int
    n_rotations: int
    iterations: int
    batch: int
    stop_posterior: float
    ema: float
    radius_start_px: float
    radius_end_px: float
    max_shift_px: float
    shift_step_px: float
    refine_rounds: int
    refine_candidates: int
    refine_radius_frac: float
    class_radius_px: float | None
    images_per_class: int
    max_classes: int
    class_search_seeds: int
    seed: int
    temperature: float = 1.0
    refine_method: str = "random"
    n_classes: int = 1


@dataclass
class SubsetSearch:
    """What the search on its subset found: the subset's poses and the map they make.

    Attributes
    ----------
    subset : (n,) indices of the searched particles, sorted.
    rotations : (n, 3, 3) and shifts_px : (n, 2) their poses, in the frame of the map
        (not yet centred: :func:`centre_poses`).
    fourier_volume : (N, N, N) complex, the subset's final map (1/N scale), against which the
        other particles are posed.
    spectra, ctf : (n, M) the subset's coefficients and CTFs (kept for the encoder stage).
    seconds : how long the search took.
    time_limit_reached : whether the deadline cut it short.
    class_averages : the 2D classes its start was made from (``start="classes"``), else None.
    em_band_px, em_posterior : per EM iteration, its band (frequency px) and the images' mean
        maximum posterior (how sharply they pick a pose): the search's convergence.
    classes : with K classes searched together, (n,) each subset image's class, 0..K-1 (its
        pose is in that class's map), else None.
    class_volumes : the K classes' maps (``fourier_volume`` is the largest class's), else None.
    """

    subset: np.ndarray
    rotations: torch.Tensor
    shifts_px: torch.Tensor
    fourier_volume: torch.Tensor
    spectra: torch.Tensor
    ctf: torch.Tensor
    seconds: float = 0.0
    time_limit_reached: bool = False
    class_averages: ClassAverages | None = None
    em_band_px: tuple[float, ...] = ()
    em_posterior: tuple[float, ...] = ()
    classes: np.ndarray | None = None
    class_volumes: list[torch.Tensor] | None = None


def class_average_settings(settings: SearchSettings, n_images: int) -> ClassAverageSettings:
    """The 2D classification that makes the search's start from class averages: the search's
    class band (its final band unless ``class_radius_px`` is given), mask and shift grid, and
    about ``images_per_class`` images per class (at most ``max_classes``).
    """
    n_classes = int(min(settings.max_classes, max(2, n_images // settings.images_per_class)))
    radius_px = settings.radius_end_px if settings.class_radius_px is None else settings.class_radius_px
    return ClassAverageSettings(mask_radius_px=settings.mask_radius_px, n_classes=n_classes,
                                radius_px=radius_px,
                                max_shift_px=settings.max_shift_px, shift_step_px=settings.shift_step_px,
                                seed=settings.seed)


def assign_settings(settings: SearchSettings, *, rounds: int, candidates: int, radius_frac: float,
                    hypotheses: int, method: str, prune_keep: int) -> AssignSettings:
    """The settings that pose particles against the search's map: its grids and final band,
    with the given refinement schedule (the search's own, longer one refines the subset while
    the map is still being made).
    """
    return AssignSettings(radius_px=settings.radius_end_px, max_shift_px=settings.max_shift_px,
                          shift_step_px=settings.shift_step_px, n_rotations=settings.n_rotations,
                          hypotheses=hypotheses, prune_keep=prune_keep, refine_method=method,
                          refine_rounds=rounds,
                          refine_candidates=candidates,
                          refine_radius_frac=radius_frac,
                          refine_start_deg=math.degrees((8 * math.pi**2 / settings.n_rotations) ** (1 / 3)),
                          seed=settings.seed)


def centre_poses(fourier_volume: torch.Tensor, rotations: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Shifts (n, 2) px for the map centred on its centre of mass ``d`` (px): projections of the
    map are projections of the centred map shifted by ``(R^T d)_xy``.
    """
    volume = ifft3_c(fourier_volume).real
    d = centre_of_mass(volume).double().cpu().numpy()
    return shifts_px + np.einsum("nji,j->ni", rotations, d)[:, :2]


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(x, y, z)`` in pixels from the box centre of the positive part of a
    (N, N, N) volume.
    """
    w = volume.clamp_min(0)
    g = grid_3d(volume.shape[-1], device=volume.device, dtype=volume.dtype)
    return (g * w[..., None]).sum(dim=(0, 1, 2)) / w.sum().clamp_min(1e-12)


def search_subset(particles: ParticleSpectra, settings: SearchSettings, *,
                  log: Callable[[str], None] = print, deadline: float | None = None,
                  start: torch.Tensor | str | None = None, progress: Progress | None = None) -> SubsetSearch:
    """Steps 1-2 of the module docstring: the EM and the refinement on the subset.

    Parameters
    ----------
    particles : the particles' spectra and CTFs.
    settings : the search's options.
    log : progress lines.
    deadline : a ``time.perf_counter()`` time: past it, the EM stops and the remaining local
        refinement rounds are skipped, and the log says so.
    start : (N, N, N) complex, a map to start the EM from (:func:`starting_map`) instead of a
        blob; the EM then runs at ``radius_end_px`` from its first iteration, and the poses are
        in this map's frame. ``"classes"``: such a map made from the subset's 2D class averages
        (:func:`start_from_class_averages`), for data whose images carry too little signal each
        for the search from a blob.
    progress : ``progress(what, done, total)`` after each EM iteration, refinement round and 2D
        classification iteration (e.g. a progress bar), or None.
    """
    return _Search(particles, settings, log, deadline, start=start, progress=progress).run()


def start_from_class_averages(formation, spectra: torch.Tensor, ctf: torch.Tensor,
                              settings: SearchSettings, *, log: Callable[[str], None] = print,
                              deadline: float | None = None, progress: Progress | None = None
                              ) -> tuple[torch.Tensor | None, ClassAverages]:
    """A start for the search made from the images' 2D class averages.

    At a whitened signal energy of about 200 per image (within 10 px), the search from a blob
    fails while a map of the molecule's shape at 80 A is enough for the same images to pose
    themselves (docs/pipeline.md#search-start). Averages of about 60 images carry 60 times
    the energy each. So: the images are classified in 2D (:func:`class_averages`), the class
    averages are posed by the search as particles (:func:`class_particles`;
    ``settings.class_search_seeds`` seeds, the map that explains most of them kept), and that map
    is the start.

    Parameters
    ----------
    formation : the coefficient layout.
    spectra, ctf : (B, M) the search subset's coefficients and CTFs.
    settings : the search's options (its band, grids, mask and seed).
    log : progress lines.
    deadline, progress : as :func:`search_subset`'s.

    Returns
    -------
    The start, (N, N, N) complex (1/N scale) (None, a blob, when fewer than 2 classes hold
    enough images), and the class averages.
    """
    t0 = time.perf_counter()
    classify = class_average_settings(settings, len(spectra))
    averages = class_averages(formation, spectra, ctf, classify, log=log, progress=progress)
    y, c = class_particles(formation, averages, min_images=classify.min_images)
    if len(y) < 2:
        log(f"search start: the 2D classification left {len(y)} class(es) of "
            f"{classify.min_images:g}+ images: starting from a blob")
        return None, averages
    r_max = max_paired_radius_px(formation.box_px)
    best = None
    for k in range(settings.class_search_seeds):
        seed = settings.seed + 100 * k
        on_classes = replace(settings, subset=len(y), batch=len(y), seed=seed, refine_rounds=4,
                             refine_radius_frac=averages.radius_px / r_max)
        found = _Search(SpectraInMemory(y, c, formation), on_classes, lambda _m: None, deadline).run()
        score, _, _, _ = score_spectra(formation, found.fourier_volume, y, c, found.rotations,
                                       found.shifts_px, averages.radius_px)
        fit = float(score.clamp_min(0).square().sum())  # the averages' signal energy the map explains
        if best is None or fit > best[0]:
            best = (fit, found.fourier_volume)
        if progress is not None:
            progress("class-average searches", k + 1, settings.class_search_seeds)
    kept = int((averages.sizes >= classify.min_images).sum())
    log(f"search start: {kept} class averages of {len(spectra)} images (2D classification "
        f"{averages.seconds:.0f} s), posed from {settings.class_search_seeds} seeds; "
        f"{time.perf_counter() - t0:.0f} s in all")
    return best[1], averages


def starting_map(volume: torch.Tensor, pixel_size_a: float, resolution_a: float) -> torch.Tensor:
    """A user's map as the search's start: its centred Fourier transform (1/N scale) under a
    Gaussian low-pass whose amplitude falls to exp(-1/2) at ``resolution_a``.

    A blob of the molecule's shape is all the start needs: at a whitened signal energy of 93
    per image (an SNR where the blob start fails), the true map blurred to 40, 60 or 80 A
    gave the same poses (2.1 deg; docs/pipeline.md#search-start). Blurring keeps a detailed
    start (a homologue, another run's map) from imposing its detail on the particles.

    Parameters
    ----------
    volume : (N, N, N) real map, [z, y, x].
    pixel_size_a : its voxel size, Angstrom.
    resolution_a : the low-pass, Angstrom.
    """
    n = volume.shape[-1]
    k = grid_3d(n, device=volume.device, dtype=volume.dtype).norm(dim=-1) / (n * pixel_size_a)  # 1/A
    return fft3_c(volume) / n * torch.exp(-0.5 * (k * resolution_a) ** 2)


def repose_subset(found: SubsetSearch, assigner: PoseAssigner, *, block: int = 4096) -> SubsetSearch:
    """Step 2b: the subset's poses from ``assigner`` (global first guess and refinement against
    the search's final map), instead of the search's own. Returns the updated search.
    """
    rotations, shifts_px = [], []
    for start in range(0, len(found.spectra), block):
        rot, sh = assigner.assign(found.spectra[start:start + block], found.ctf[start:start + block])
        rotations.append(rot)
        shifts_px.append(sh)
    return replace(found, rotations=torch.cat(rotations).to(found.rotations.dtype),
                   shifts_px=torch.cat(shifts_px).to(found.shifts_px.dtype))


def repose_classes(found: SubsetSearch, formation, settings: AssignSettings) -> SubsetSearch:
    """Step 2b with K classes searched together: each class's images posed afresh against their
    class's map (:func:`repose_subset`), each in its own class's frame.
    """
    rotations, shifts_px = found.rotations.clone(), found.shifts_px.clone()
    for k, volume in enumerate(found.class_volumes):
        rows = torch.as_tensor(np.flatnonzero(found.classes == k), device=found.spectra.device)
        if len(rows) == 0:
            continue
        part = repose_subset(replace(found, spectra=found.spectra[rows], ctf=found.ctf[rows],
                                     rotations=rotations[rows], shifts_px=shifts_px[rows]),
                             PoseAssigner(formation, volume, settings))
        rotations[rows], shifts_px[rows] = part.rotations, part.shifts_px
    return replace(found, rotations=rotations, shifts_px=shifts_px)


def assign_remaining(particles: ParticleSpectra, found: SubsetSearch, assigner: PoseAssigner, *,
                     log: Callable[[str], None] = print, block: int = 4096,
                     progress: Progress | None = None, shard: Shard = ALONE) -> Poses:
    """Steps 3-4: the particles outside the subset posed against the subset's map by
    ``assigner`` (amortized or global), then every shift moved to the map centred on its centre
    of mass. ``shard``: under torchrun, this process poses its block of those particles and the
    poses are gathered (a sum over the processes): every process returns every pose.

    Returns
    -------
    :class:`Poses` of every particle (CPU), shifts in Angstrom.
    """
    n_total = len(particles)
    rotations = np.zeros((n_total, 3, 3))
    shifts_px = np.zeros((n_total, 2))
    rest = shard.rows(np.setdiff1d(np.arange(n_total), found.subset))
    done = 0
    for start in range(0, len(rest), block):
        part = rest[start:start + block]
        y, c = particles.read(part)
        rot, sh = assigner.assign(y, c)
        rotations[part] = rot.double().cpu().numpy()
        shifts_px[part] = sh.double().cpu().numpy()
        done += len(part)
        log(f"assignment ({assigner.mode}): {done}/{len(rest)} remaining particles")
        if progress is not None:
            progress("assignment", done, len(rest))
    if shard.size > 1:  # every process's block, added (each row is posed by one process)
        rotations = shard.sum_(torch.from_numpy(rotations)).numpy()
        shifts_px = shard.sum_(torch.from_numpy(shifts_px)).numpy()
    rotations[found.subset] = found.rotations.double().cpu().numpy()
    shifts_px[found.subset] = found.shifts_px.double().cpu().numpy()
    shifts_px = centre_poses(found.fourier_volume, rotations, shifts_px)
    return Poses.from_arrays(rotations, shifts_px * particles.formation.pixel_size_a)


def assign_poses(particles: ParticleSpectra, assigner: PoseAssigner, *, block: int = 4096):
    """Poses of particles against ``assigner``'s map (e.g. a run's), which stays fixed: the
    poses are in its frame, and every particle costs the same.

    Parameters
    ----------
    particles : the particles' spectra and CTFs.
    assigner : the map, the first guess (amortized or global) and the refinement.
    block : particles read and assigned at a time (memory is bounded by it).

    Yields
    ------
    (rotations (b, 3, 3), shifts_a (b, 2)) float32 numpy blocks, in particle order.
    """
    for start in range(0, len(particles), block):
        y, c = particles.read(np.arange(start, min(start + block, len(particles))))
        rot, shifts_px = assigner.assign(y, c)
        yield (rot.float().cpu().numpy(),
               (shifts_px * particles.formation.pixel_size_a).float().cpu().numpy())


class _Search:
    """The state of one :func:`search_subset` run: the EM (map and grids) and the generator."""

    def __init__(self, particles: ParticleSpectra, settings: SearchSettings, log, deadline=None,
                 start: torch.Tensor | None = None, progress: Progress | None = None):
        self.particles = particles
        self.progress = progress or (lambda what, done, total: None)
        self.start = start
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
            generator=self.gen, n_classes=settings.n_classes)

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
        averages = None
        if isinstance(self.start, str):
            if self.start != "classes":
                raise ValueError(f"unknown search start {self.start!r}")
            self.start, averages = start_from_class_averages(self.formation, y, c, st, log=self.log,
                                                             deadline=self.deadline, progress=self.progress)
        if st.n_classes > 1 and self.start is not None:
            raise ValueError("K classes are searched from blobs only (no start map or class averages)")
        if self.start is None:
            em.initialise(y[: st.batch], c[: st.batch], r0)
        else:
            # The given map, at the scale of the data (the blob of random poses is: the power of
            # both within the band is made equal), and the EM at its final band from the start:
            # at the first band a start is lost again (docs/pipeline.md#search-start).
            r0 = r1
            em.initialise(y[: st.batch], c[: st.batch], r1)
            band = grid_3d(self.n, device=em.fourier_volume.device).norm(dim=-1) <= r1
            start = self.start.to(em.fourier_volume.device, em.fourier_volume.dtype)
            gain = (em.fourier_volume[band].abs().square().sum() /
                    start[band].abs().square().sum().clamp_min(1e-30)).sqrt()
            em.fourier_volume = start * gain
        bands, posteriors = [], []
        for it in range(st.iterations):
            r = r0 + (r1 - r0) * min(1.0, it / max(1, int(0.7 * st.iterations)))
            idx = torch.randperm(n_sub, generator=self.gen)[: st.batch].to(self.particles.device)
            out = em.iterate(y[idx], c[idx], r, ema=st.ema, temperature=st.temperature)
            post = float(out["posterior_max"].mean())
            bands.append(round(float(r), 3))
            posteriors.append(round(post, 4))
            converged = r >= r1 and post >= st.stop_posterior
            self.progress("search EM", st.iterations if converged else it + 1, st.iterations)
            if (it + 1) % 10 == 0 or it == st.iterations - 1 or converged:
                shares = "" if st.n_classes == 1 else ", classes " + "/".join(
                    f"{share:.0%}" for share in out["class_posterior"].mean(0).tolist())
                self.log(f"search EM {it + 1}/{st.iterations}: radius {r:.1f} px, mean max posterior "
                         f"{post:.2f}{shares}, {time.perf_counter() - t0:.0f} s")
            if converged:
                break
            if self._past_deadline(f"EM stopped after {it + 1} iterations"):
                break
        # Assign every subset image on the final low-resolution map, then refine locally.
        classes, class_volumes = None, None
        if st.n_classes > 1:
            rot, shifts, classes, class_volumes = self._finish_classes(y, c, r1)
            volume = class_volumes[int(np.bincount(classes, minlength=st.n_classes).argmax())]
        else:
            rot, shifts = self._assign(y, c, r1)
            rot, shifts = self._refine(y, c, rot, shifts, start_radius=r1, update_map=True)
            volume = em.fourier_volume
        seconds = time.perf_counter() - t0
        self.log(f"search done in {seconds:.0f} s")
        return SubsetSearch(subset, rot, shifts, volume, y, c, seconds=seconds,
                            time_limit_reached=self.deadline_said, class_averages=averages,
                            em_band_px=tuple(bands), em_posterior=tuple(posteriors), classes=classes,
                            class_volumes=class_volumes)

    def _finish_classes(self, y, c, radius):
        """With K classes: each subset image posed against every class's final EM map (the
        global assignment) and put in the class whose projection at its pose fits it best
        (the smallest squared error), then each class's images refined locally against their
        class's map, made again from them after each round.

        Returns
        -------
        rotations (n, 3, 3), shifts (n, 2), classes (n,) and the K maps.
        """
        em = self.em
        volumes = list(em.class_volumes)
        d = SearchData.in_band(self.formation, y, c, radius)
        poses, errors = [], []
        for volume in volumes:
            rot, shifts = assign_global(self.formation, volume, y, c, radius, em.grid, em.shifts,
                                        workspace=em.workspace)
            proj = sample_volume(volume, slice_coords(rot, d.coords_px))[:, None]  # (n, 1, P)
            errors.append(score_hypotheses(d, proj, shifts[:, None, :]).reshape(-1))
            poses.append((rot, shifts))
        best = torch.stack(errors, 1).argmin(1)
        rot = torch.stack([r for r, _ in poses], 1)[torch.arange(len(y)), best]
        shifts = torch.stack([s for _, s in poses], 1)[torch.arange(len(y)), best]
        classes = best.cpu().numpy()
        maps = []
        for k, volume in enumerate(volumes):
            members = torch.as_tensor(np.flatnonzero(classes == k), device=y.device)
            if len(members) < 2:
                maps.append(volume)
                continue
            em.fourier_volume = volume
            rot[members], shifts[members] = self._refine(
                y[members], c[members], rot[members], shifts[members], start_radius=radius, update_map=True)
            maps.append(em.fourier_volume)
        em.class_volumes = maps
        self.log("search classes: " + ", ".join(f"{int((classes == k).sum())}" for k in range(len(maps)))
                 + f" of {len(y)} images")
        return rot, shifts, classes, maps

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
        newton = st.refine_method == "newton"
        angle = self.em.grid_step_rad / (2 if newton else 1)
        shift_step = st.shift_step_px / 2
        for k in range(st.refine_rounds):
            if self._past_deadline(f"local refinement stopped after {k} of {st.refine_rounds} rounds"):
                break
            r = start_radius + (r_end - start_radius) * (k + 1) / st.refine_rounds
            if newton:
                rot, shifts = refine_newton(self.formation, self.em.fourier_volume, y, c, rot, shifts, r,
                                            step_rad=angle, shift_step_px=shift_step)
                angle, shift_step = angle / 2, shift_step / 2
            else:
                rot, shifts = refine_local(self.formation, self.em.fourier_volume, y, c, rot, shifts, r,
                                           max_angle_rad=angle, n_candidates=st.refine_candidates,
                                           shift_step_px=shift_step, generator=self.gen)
                angle = max(angle * 0.6, math.radians(0.5))
                shift_step = max(shift_step * 0.7, 0.1)
            if update_map:
                self._hard_backprojection(y, c, rot, shifts, r)
            self.progress("search refinement", k + 1, st.refine_rounds)
        return rot, shifts
