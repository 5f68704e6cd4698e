"""2D class averages: images sorted into K classes and aligned in-plane, by expectation-maximisation.

What RELION's and cryoSPARC's 2D classification does, in this project's coefficient layout and
noise model, for one purpose here: a **start for the pose search at low SNR**. A single image
at a whitened signal energy below about 200 per image (within 10 px) says too little about its
pose for the search to find the molecule's shape from a blob (docs/pipeline.md#search-start),
while an average of a hundred aligned images carries a hundred times the energy. The in-plane
search (rotations about the view axis and shifts) has far fewer hypotheses than SO(3), so
averages form where single-image 3D posing does not.

The model of an image ``Y`` (spectrum, CTF ``C``) of class ``k`` at in-plane angle ``a`` and
shift ``s`` is ``C T_s A_k(R_a q)``: the class average's centred spectrum ``A_k`` read at rotated
frequencies. Its errors against every class x angle x shift are the (B, S, K J) scores of
:func:`cryoai.reconstruction.em.score_grid` (each class at each angle is one "projection"); the
M step is the posterior-weighted sums of :class:`cryoai.reconstruction.em.ExpectationMaximisation`,
inserted into each class's plane at the rotated frequencies (:func:`insert_planes`).

Each class average then stands for its images as one particle: with ``N_k = sum_i C_i^2`` and
``U_k = sum_i C_i conj(T_i) Y_i`` (the sums at the class frame's frequencies), the particle
``(y, c) = (U_k / sqrt(N_k), sqrt(N_k))`` has, up to a constant, the same squared error against
any projection ``P`` as its images together: ``||y - c P||^2 = const - 2 Re <U_k, P> + <N_k, |P|^2>``,
and, for whitened images, unit noise per coefficient, as a single whitened image has. So the
pose search takes the averages unchanged (:func:`class_particles`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.image_formation import ImageFormation
from ..physics.backprojection import insert_planes
from ..physics.fft import fft2_c, ifft2_c
from ..physics.grids import radius_grid_2d
from ..physics.masks import circular_mask
from ..physics.projection import inplane_rotations, sample_planes
from ..physics.shifts import phase_shift
from .em import SearchData, Workspace, posterior_and_max_, score_grid, shift_grid


@dataclass
class ClassAverageSettings:
    """The options of :func:`class_averages`.

    Attributes
    ----------
    mask_radius_px : radius of the soft circular mask of the averages, pixels.
    n_classes : K.
    n_angles : in-plane angles (36: 10 deg apart, 1.7 px at 10 px from DC).
    iterations : EM iterations over all the images.
    radius_px : the band used, frequency pixels.
    max_shift_px, shift_step_px : the shift grid (a disk), pixels.
    first_max_shift_px, first_fraction : the shift grid's radius in the first ``first_fraction``
        of the iterations, while the classes form. Each shift is more hypotheses an image's
        noise can match: on a set at a whitened signal energy of 93, classes formed with shifts
        up to 2 px (their images' view directions 19 deg apart, median over classes) and not
        with shifts up to 6 px (65 deg; docs/pipeline.md#search-start).
    reg_fraction : the averages' Wiener constant, a fraction of the mean CTF^2 sum in the band.
    min_images : a class with fewer images (by their most probable class) takes half of the
        largest class's.
    first_noise_factor, anneal_fraction : the noise variance of the posterior is taken this many
        times its estimate in the first iteration, the factor falling geometrically to 1 over the
        first ``anneal_fraction`` of the iterations (deterministic annealing, as cryoSPARC's
        "initial classification uncertainty factor"): images then spread over the classes while
        the averages are still noise, instead of locking onto the first chance match. On five
        sets at whitened signal energies of 61-215 the classes' view spread fell from 15-28 to
        14-27 deg, on every seed measured (docs/pipeline.md#search-start).
    seed : seeds the first classes.
    """

    mask_radius_px: float
    n_classes: int = 50
    n_angles: int = 36
    iterations: int = 30
    radius_px: float = 10.0
    max_shift_px: float = 6.0
    shift_step_px: float = 2.0
    first_max_shift_px: float = 2.0
    first_fraction: float = 0.6
    reg_fraction: float = 0.01
    min_images: float = 10.0
    first_noise_factor: float = 3.0
    anneal_fraction: float = 0.5
    seed: int = 0


@dataclass
class ClassAverages:
    """What :func:`class_averages` found.

    Attributes
    ----------
    numerator : (K, N, N) complex, ``sum post C conj(T) Y`` of each class at its frame's
        frequencies (centred, 1/N scale).
    denominator : (K, N, N) real, ``sum post C^2``.
    images : (K, N, N) real, the averages in real space (masked), for a person to look at.
    sizes : (K,) the images' summed posterior per class.
    radius_px : the band the classes were made in.
    assignment : (B,) each image's most probable class.
    seconds : how long it took.
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    images: torch.Tensor
    sizes: torch.Tensor
    radius_px: float
    assignment: torch.Tensor
    seconds: float = 0.0


def class_averages(formation: ImageFormation, spectra: torch.Tensor, ctf: torch.Tensor,
                   settings: ClassAverageSettings, *, log: Callable[[str], None] = print,
                   chunk: int = 128, first: tuple[torch.Tensor, torch.Tensor] | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> ClassAverages:
    """K class averages of images by in-plane EM (see the module docstring).

    Parameters
    ----------
    formation : the coefficient layout.
    spectra, ctf : (B, M) the images' coefficients and CTFs (whitened, as the search reads them).
    settings : the options.
    log : progress lines.
    chunk : images scored at a time.
    first : (B,) classes and (B,) in-plane angle indices to make the first averages from
        (default: random).
    """
    t0 = time.perf_counter()
    st = settings
    n = formation.box_px
    device = spectra.device
    gen = torch.Generator().manual_seed(st.seed + 777)
    data = SearchData.in_band(formation, spectra, ctf, st.radius_px)
    b, p = data.spectra.shape
    k = min(st.n_classes, b)
    angles = torch.arange(st.n_angles, dtype=torch.float32, device=device) * (2 * math.pi / st.n_angles)
    points = inplane_rotations(angles, data.coords_px)  # (J, P, 2)
    n_a = st.n_angles
    mask = circular_mask(n, st.mask_radius_px, soft_edge_px=4, device=device, dtype=torch.float32)
    inside = radius_grid_2d(n, device=device) <= st.radius_px
    ws = Workspace()

    # The first classes: the images split at random among the classes, each at a random angle
    # and no shift (rotationally blurred blobs that the EM then tells apart).
    labels = torch.randint(k, (b,), generator=gen).to(device)
    angle_idx = torch.randint(n_a, (b,), generator=gen).to(device)
    if first is not None:
        labels, angle_idx = (v.to(device) for v in first)
    num, den = _hard_sums(data, labels, angle_idx, points, k, n)
    planes = _solve(num, den, st.reg_fraction, inside, mask)
    sizes = torch.bincount(labels, minlength=k).to(torch.float32)
    assignment = labels
    narrow = shift_grid(min(st.first_max_shift_px, st.max_shift_px), st.shift_step_px, device=device)
    wide = shift_grid(st.max_shift_px, st.shift_step_px, device=device)
    for it in range(st.iterations):
        shifts = narrow if it < st.first_fraction * st.iterations else wide
        anneal = st.first_noise_factor ** max(0.0, 1.0 - it / max(st.anneal_fraction * st.iterations, 1.0))
        phases = phase_shift(data.freqs_px, shifts)  # (S, P)
        n_s = len(shifts)
        proj = sample_planes(planes, points).reshape(k * n_a, p)  # (K J, P)
        num_re = torch.zeros(k * n_a, p, device=device)
        num_im = torch.zeros_like(num_re)
        den_slices = torch.zeros_like(num_re)
        sigma2 = None
        best, post_max = [], []
        for start in range(0, b, chunk):
            d = data.rows(start, start + chunk)
            y, c = d.spectra, d.ctf
            rows = len(y)
            err = score_grid(d, proj, shifts, out=ws.get("scores", (chunk * n_s * k * n_a,), device=device))
            flat = err.view(rows, n_s * k * n_a)
            emin, arg = flat.min(dim=-1)
            if sigma2 is None:  # noise per coefficient from the best fits (as the 3D EM does)
                sigma2 = float(emin.mean() / d.weight.sum().clamp_min(1)) * anneal + 1e-12
            post, top = posterior_and_max_(flat, 1.0 / (2 * sigma2), emin)
            post_max.append(top)
            best.append(arg)
            x = (c * y)[:, None, :] * phases.conj()[None]  # (b, S, P)
            pt = post.view(rows * n_s, k * n_a).T
            num_re.addmm_(pt, x.real.reshape(rows * n_s, p))
            num_im.addmm_(pt, x.imag.reshape(rows * n_s, p))
            den_slices.addmm_(post.view(rows, n_s, k * n_a).sum(1).T, c * c)
        best_arg = torch.cat(best)  # flat index (shift * K + class) * J + angle
        assignment = (best_arg % (k * n_a)) // n_a
        sizes = torch.bincount(assignment, minlength=k).to(torch.float32)
        num, den = insert_planes(torch.complex(num_re, num_im).reshape(k, n_a * p),
                                 den_slices.reshape(k, n_a * p), points.reshape(-1, 2), n)
        empty = torch.nonzero(sizes < st.min_images).flatten()
        if len(empty) and it < st.iterations - 1:
            # Classes that lost their images take half of the largest classes' images each (at
            # their best angles and shifts): the two halves then part as the EM goes on, as
            # the split step of k-means (LBG) does.
            best_angle, best_shift = best_arg % n_a, best_arg // (k * n_a)
            largest = torch.argsort(sizes, descending=True).tolist()
            for e, big in zip(empty.tolist(), largest[: len(empty)], strict=True):
                if sizes[big] < 2 * st.min_images:
                    break
                members = torch.nonzero(assignment == big).flatten()
                half = members[torch.randperm(len(members), generator=gen)[: len(members) // 2].to(device)]
                sub = SearchData(data.spectra[half] * phases[best_shift[half]].conj(), data.ctf[half],
                                 data.weight, data.coords_px, data.freqs_px)
                n2, d2 = _hard_sums(sub, torch.zeros_like(half), best_angle[half], points, 1, n)
                num[e], den[e] = n2[0], d2[0]
                assignment[half] = e
                sizes[e], sizes[big] = len(half), sizes[big] - len(half)
        planes = _solve(num, den, st.reg_fraction, inside, mask)
        pm = float(torch.cat(post_max).mean())
        if progress is not None:
            progress("2D classes", it + 1, st.iterations)
        if (it + 1) % 5 == 0 or it == st.iterations - 1:
            full = int((sizes >= st.min_images).sum())
            log(f"class averages {it + 1}/{st.iterations}: {full} of {k} classes with {st.min_images:g}+ "
                f"images, mean max posterior {pm:.2f}, {time.perf_counter() - t0:.0f} s")
    images = ifft2_c(planes).real
    return ClassAverages(num, den, images, sizes, float(st.radius_px), assignment,
                         seconds=time.perf_counter() - t0)


def class_particles(formation: ImageFormation, averages: ClassAverages, *,
                    min_images: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The class averages as particles (the module docstring): spectra ``U / sqrt(N)`` and CTFs
    ``sqrt(N)`` at the layout's coefficients within the classes' band (zero beyond), for the
    classes of at least ``min_images`` images.

    Returns
    -------
    spectra (K', M) complex and ctf (K', M) real.
    """
    n = formation.box_px
    keep = averages.sizes >= min_images
    kx, ky = formation.coords_px.long().unbind(-1)
    # DC is its own Hermitian mate: insert_planes counted each image's DC twice.
    once = torch.where((formation.coords_px == 0).all(-1), 0.5, 1.0)
    u = averages.numerator[keep][:, ky + n // 2, kx + n // 2] * once
    w = averages.denominator[keep][:, ky + n // 2, kx + n // 2].clamp_min(0) * once
    band = formation.band(averages.radius_px)[None]
    root = w.sqrt()
    spectra = torch.where(band & (root > 0), u / root.clamp_min(1e-12), torch.zeros_like(u))
    return spectra, torch.where(band, root, torch.zeros_like(root))


def _hard_sums(data: SearchData, labels: torch.Tensor, angle_idx: torch.Tensor, points: torch.Tensor,
               k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums of each class for images at given classes and angles (no shift)."""
    n_a, p = points.shape[0], points.shape[1]
    slot = labels * n_a + angle_idx
    num = torch.zeros(k * n_a, p, dtype=data.spectra.dtype, device=data.spectra.device)
    den = torch.zeros(k * n_a, p, dtype=data.ctf.dtype, device=data.ctf.device)
    num.index_add_(0, slot, data.ctf * data.spectra)
    den.index_add_(0, slot, data.ctf * data.ctf)
    return insert_planes(num.reshape(k, n_a * p), den.reshape(k, n_a * p), points.reshape(-1, 2), n)


def _solve(num: torch.Tensor, den: torch.Tensor, reg_fraction: float, inside: torch.Tensor,
           mask: torch.Tensor) -> torch.Tensor:
    """Each class's average ``num / (den + lambda)`` in the band, masked in real space."""
    lam = reg_fraction * (den * inside).sum(dim=(-2, -1), keepdim=True) / inside.sum()
    f = torch.where(inside, num / (den + lam.clamp_min(1e-12)), torch.zeros_like(num))
    f = fft2_c(ifft2_c(f).real * mask)
    return torch.where(inside, f, torch.zeros_like(f))
