"""Pose registration, rotation/translation errors, volume alignment and FSC against a truth.

An ab initio reconstruction is defined up to a global rotation ``A`` and a mirror ``J``
(``J = diag(1, 1, -1)``): if the truth has poses ``R_i``, an equally good answer has poses
``A J^m R_i J^m`` and the volume ``V_p(x) = V(J^m A^T x)``. We estimate ``A`` by orthogonal
Procrustes for ``m = 0`` and ``m = 1`` and keep the better, then resample
``V_aligned(y) = V_p(A J^m y)`` before the FSC.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics.fsc import fsc, resolution_px
from ..physics.grids import grid_3d
from ..physics.projection import sample_volume
from ..physics.rotations import frobenius_distance_sq, frobenius_sq_to_angle, procrustes_rotation
from ..physics.symmetry import point_group

MIRROR = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def align_rotations(pred: np.ndarray, true: np.ndarray, symmetry: torch.Tensor | None = None) -> dict:
    """Global alignment of predicted to true rotations.

    Parameters
    ----------
    pred, true : (N, 3, 3) rotations.
    symmetry : (G, 3, 3) the map's point group (:func:`cryoai.physics.symmetry.point_group`):
        each true pose then stands for its G equivalents ``S_k R_true``, and each particle's
        error is to the nearest of them; None: no symmetry.

    Returns
    -------
    dict with ``A`` (3, 3), ``mirror`` (bool), ``frobenius_sq`` (N,) per-particle
    ``||R_pred - A J^m S_k R_true J^m||_F^2`` (``S_k`` the nearest element, or the identity),
    ``angle_deg`` (N,) and ``symmetry_element`` (N,) the index ``k``.
    """
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(true, dtype=torch.float64)
    best = None
    for mirror in (False, True):
        m = MIRROR @ t @ MIRROR if mirror else t
        if symmetry is None or len(symmetry) == 1:
            a = procrustes_rotation(m, p)
            d = frobenius_distance_sq(p, a @ m)
            k = torch.zeros(len(p), dtype=torch.int64)
        else:
            a, d, k = _align_with_symmetry(p, m, torch.as_tensor(symmetry, dtype=torch.float64))
        med = float(d.median())
        if best is None or med < best["median"]:
            best = {"A": a, "mirror": mirror, "frobenius_sq": d, "median": med, "element": k}
    d = best["frobenius_sq"]
    return {
        "A": best["A"].numpy(),
        "mirror": best["mirror"],
        "frobenius_sq": d.numpy(),
        "angle_deg": np.degrees(frobenius_sq_to_angle(d).numpy()),
        "symmetry_element": best["element"].numpy(),
    }


def pose_agreement(first: np.ndarray, second: np.ndarray, *, within_deg: float = 10.0,
                   starts: int = 32, seed: int = 0) -> float:
    """The share of particles that two sets of poses of the same images place alike, up to one
    global rotation and a mirror (two ab initio solutions are defined up to both).

    Robust to a large share of disagreeing particles: each candidate global rotation is the
    Procrustes fit of all the particles or one particle's ``first_i second_i^T`` (``starts`` of
    them, drawn with ``seed``), refined once by the Procrustes fit of the particles it places
    within ``within_deg``; the best candidate's share within ``within_deg`` is returned. Two
    searches that found the same map agree on most particles (the share is about the share of
    particles each poses within ``within_deg / 2``); two wrong ones agree on few (by chance,
    a 10 deg ball holds 0.03% of all rotations). The poses of a molecule with a point group of
    order G agree up to a group element per particle: the share can then be as low as 1/G.

    Parameters
    ----------
    first, second : (N, 3, 3) the rotations each set gives the same N particles.
    within_deg : the angle within which two poses agree.
    starts : single-particle candidates per mirror.
    seed : draws the candidates.
    """
    a = torch.as_tensor(first, dtype=torch.float64)
    n = len(a)
    if n == 0:
        return float("nan")
    limit = float(2 * (1 - np.cos(np.radians(within_deg))) * 2)  # ||R - S||_F^2 at that angle
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:starts]
    best = 0.0
    for mirror in (False, True):
        b = torch.as_tensor(second, dtype=torch.float64)
        b = MIRROR @ b @ MIRROR if mirror else b
        for g in [procrustes_rotation(b, a)] + [a[i] @ b[i].T for i in order.tolist()]:
            close = frobenius_distance_sq(a, g @ b) <= limit
            if int(close.sum()) >= 3:
                g = procrustes_rotation(b[close], a[close])
                close = frobenius_distance_sq(a, g @ b) <= limit
            best = max(best, float(close.double().mean()))
    return best


def _align_with_symmetry(pred: torch.Tensor, true: torch.Tensor, group: torch.Tensor, *,
                         starts: int = 16, iterations: int = 20
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A`` and each particle's group element ``k`` minimising the median of
    ``||pred_i - A S_k true_i||_F^2``: alternate the nearest element per particle and the
    Procrustes fit of ``A``, from the plain fit and from single particles' ``pred_i true_i^T``
    (deterministic), keeping the best. Returns ``(A, distances (N,), k (N,))``.
    """
    n = len(pred)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:starts]
    initial = [procrustes_rotation(true, pred)] + [pred[i] @ true[i].T for i in order.tolist()]
    equivalents = torch.einsum("gij,njk->gnik", group, true)  # (G, N, 3, 3): S_k true_i
    best = None
    for a in initial:
        previous = None
        for _ in range(iterations):
            # trace(pred^T A S_k true) for every k: the nearest element has the largest.
            agreement = torch.einsum("nij,gnij->gn", pred, a @ equivalents)
            k = agreement.argmax(dim=0)
            if previous is not None and torch.equal(k, previous):
                break
            previous = k
            a = procrustes_rotation(equivalents[k, torch.arange(n)], pred)
        d_all = frobenius_distance_sq(pred[None], a @ equivalents)  # (G, N)
        d, k = d_all.min(dim=0)
        if best is None or float(d.median()) < float(best[1].median()):
            best = (a, d, k)
    return best


def align_volume(volume: np.ndarray, rotation: np.ndarray, mirror: bool) -> np.ndarray:
    """Resample a predicted volume into the frame of the truth: ``V(A J^m y)`` (trilinear)."""
    n = volume.shape[-1]
    v = torch.as_tensor(volume, dtype=torch.float64)
    a = torch.as_tensor(rotation, dtype=torch.float64)
    if mirror:
        a = a @ MIRROR
    pts = grid_3d(n, dtype=torch.float64).reshape(-1, 3) @ a.T
    return sample_volume(v, pts).reshape(n, n, n).numpy()


def _phase_shift_volume(f: np.ndarray, shift_zyx: np.ndarray) -> np.ndarray:
    """Multiply an (uncentred) 3D spectrum by the phase that moves the volume by ``shift_zyx``."""
    n = f.shape[0]
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return f * np.exp(-2j * np.pi * (kz * shift_zyx[0] + ky * shift_zyx[1] + kx * shift_zyx[2]))


def register_translation(volume: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translate ``volume`` onto ``reference`` with sub-voxel precision.

    The integer peak of the FFT cross-correlation, then a parabolic fit per axis and a local
    refinement of the correlation over sub-voxel shifts (0.05 voxel steps) applied as Fourier
    phase shifts. Returns the moved volume and the shift (z, y, x) applied, in voxels.
    """
    fa = np.fft.fftn(volume)
    fb = np.fft.fftn(reference)
    cross = fb * np.conj(fa)
    cc = np.fft.ifftn(cross).real
    n = np.array(cc.shape)
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    shift = np.where(peak > n // 2, peak - n, peak).astype(float)
    for axis in range(3):
        idx = [int(v) for v in peak]
        vals = []
        for d in (-1, 0, 1):
            j = list(idx)
            j[axis] = (idx[axis] + d) % n[axis]
            vals.append(cc[tuple(j)])
        denom = vals[0] - 2 * vals[1] + vals[2]
        if denom < 0:
            shift[axis] += float(np.clip(0.5 * (vals[0] - vals[2]) / denom, -0.5, 0.5))

    def score(sh):
        return float((np.conj(_phase_shift_volume(fa, sh)) * fb).real.sum())

    step = 0.05
    best = score(shift)
    for _ in range(20):  # coordinate ascent on a 0.05-voxel lattice
        improved = False
        for axis in range(3):
            for d in (-step, step):
                trial = shift.copy()
                trial[axis] += d
                val = score(trial)
                if val > best:
                    best, shift, improved = val, trial, True
        if not improved:
            break
    moved = np.fft.ifftn(_phase_shift_volume(fa, shift)).real
    return moved, shift


def fsc_report(volume: np.ndarray, truth: np.ndarray, pixel_size_a: float) -> dict:
    """FSC curve and resolutions at 0.5 and 0.143 in px and Angstrom."""
    curve = fsc(torch.as_tensor(volume, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64))
    out = {"fsc": curve.numpy().tolist()}
    for t in (0.5, 0.143):
        r = resolution_px(curve, t)
        out[f"resolution_px_{t}"] = r
        out[f"resolution_a_{t}"] = r * pixel_size_a
    return out


def fsc_auc(volume: np.ndarray, truth: np.ndarray) -> float:
    """The area under the FSC curve of ``volume`` against ``truth``, frequency in cycles per
    pixel from 0 to Nyquist (0.5): 0.5 for a perfect map, CryoBench's per-image measure of a
    heterogeneous reconstruction (Jeon et al., NeurIPS 2024) when ``volume`` is a particle's map
    and ``truth`` its true state's.
    """
    curve = fsc(torch.as_tensor(volume, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64))
    c = curve.numpy()
    freqs = np.arange(len(c)) / (2.0 * (len(c) - 1))
    return float(np.sum(0.5 * (c[1:] + c[:-1]) * np.diff(freqs)))


def per_image_fsc_auc(volume_of, true_states: np.ndarray, state_maps: list[np.ndarray], rows: np.ndarray
                      ) -> np.ndarray:
    """CryoBench's per-image FSC-AUC: for each particle of ``rows``, the FSC-AUC
    (:func:`fsc_auc`) of its own map ``volume_of(row)`` against its true state's map
    (``state_maps[true_states[row] - 1]``, states numbered from 1 as in ``truth.csv``).
    """
    out = np.empty(len(rows))
    for i, row in enumerate(np.asarray(rows)):
        out[i] = fsc_auc(volume_of(int(row)), state_maps[int(true_states[row]) - 1])
    return out


def best_flip_fsc(volume: np.ndarray, truth: np.ndarray, pixel_size_a: float) -> dict:
    """FSC of a volume against the truth, or of its mirror, whichever is higher at 0.5.

    The mirror is ``V(x, y, -z)`` about the centre voxel ``N//2`` (a flip, then a roll by one;
    a bare flip would also move the volume by one voxel).
    """
    a = fsc_report(volume, truth, pixel_size_a)
    mirrored = np.roll(np.asarray(volume)[::-1], 1, axis=0)
    b = fsc_report(mirrored, truth, pixel_size_a)
    return a if a["resolution_px_0.5"] <= b["resolution_px_0.5"] else {**b, "mirrored": True}


def align_shifts(pred_shifts_a: np.ndarray, true_shifts_a: np.ndarray, true_rotations: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Remove the global translation of the map from predicted shifts, then measure their errors.

    A map is defined up to a 3D translation ``t``; moving it by ``t`` moves every particle's
    image shift by the in-plane part of ``t`` in that particle's frame, ``(R_i^T t)[:2]``. The
    ``t`` that best explains ``true - pred`` (least squares) is removed before the errors are
    taken, as the global rotation is removed from the rotation errors.

    Parameters
    ----------
    pred_shifts_a, true_shifts_a : (n, 2) shifts (x, y) in Angstrom.
    true_rotations : (n, 3, 3) true rotation matrices.

    Returns
    -------
    t_a : (3,) the fitted translation (Angstrom, map frame, x y z).
    errors_a : (n,) shift errors after removing it.
    """
    m = np.asarray(true_rotations, dtype=np.float64).transpose(0, 2, 1)[:, :2, :]  # (n, 2, 3)
    d = np.asarray(true_shifts_a, dtype=np.float64) - np.asarray(pred_shifts_a, dtype=np.float64)
    t_a, *_ = np.linalg.lstsq(m.reshape(-1, 3), d.reshape(-1), rcond=None)
    resid = d - m @ t_a
    return t_a, np.linalg.norm(resid, axis=1)


def class_accuracy(predicted: np.ndarray, true: np.ndarray) -> dict:
    """How well predicted classes recover the true states, up to the classes' numbering: the
    share of particles in the matched pairs of the best one-to-one matching of classes to states
    (the Hungarian method on their confusion counts, :func:`scipy.optimize.linear_sum_assignment`).

    Parameters
    ----------
    predicted, true : (N,) integer labels (any values; e.g. ``rlnClassNumber`` and ``truth.csv``'s
        ``state``).

    Returns
    -------
    dict with ``accuracy``, ``matching`` ({class: state}, classes left unmatched absent),
    ``classes`` and ``states`` (the labels, in the confusion's order) and ``confusion``
    (classes x states counts).
    """
    from scipy.optimize import linear_sum_assignment

    predicted, true = np.asarray(predicted), np.asarray(true)
    if predicted.shape != true.shape or predicted.ndim != 1:
        raise ValueError(f"labels of different shapes: {predicted.shape} and {true.shape}")
    classes, pi = np.unique(predicted, return_inverse=True)
    states, ti = np.unique(true, return_inverse=True)
    confusion = np.zeros((len(classes), len(states)), dtype=np.int64)
    np.add.at(confusion, (pi, ti), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return {
        "accuracy": float(confusion[rows, cols].sum() / max(len(true), 1)),
        "matching": {int(classes[r]): int(states[c]) for r, c in zip(rows, cols, strict=True)},
        "classes": classes.tolist(),
        "states": states.tolist(),
        "confusion": confusion.tolist(),
    }


def evaluate(volume: np.ndarray, pixel_size_a: float, *, truth_volume: np.ndarray | None = None,
             pred_rotations: np.ndarray | None = None, true_rotations: np.ndarray | None = None,
             pred_shifts_a: np.ndarray | None = None, true_shifts_a: np.ndarray | None = None,
             symmetry: str = "C1") -> dict:
    """All the metrics that the inputs allow, as a JSON-ready dict (and per-particle errors).

    ``symmetry`` : the truth's point group (RELION's names, :func:`cryoai.physics.symmetry.point_group`):
    each true pose stands for its equivalents, and a particle's error is to the nearest.
    """
    metrics: dict = {"pixel_size_a": pixel_size_a, "box_px": int(volume.shape[-1]), "symmetry": symmetry}
    aligned = volume
    per_particle = {}
    if pred_rotations is not None and true_rotations is not None:
        group = point_group(symmetry)
        reg = align_rotations(pred_rotations, true_rotations, symmetry=group)
        # The true pose each particle's error was measured to (its nearest equivalent).
        element = group[torch.as_tensor(reg["symmetry_element"])].numpy()
        if reg["mirror"]:
            element = MIRROR.numpy() @ element @ MIRROR.numpy()
        true_rotations = element @ np.asarray(true_rotations, dtype=np.float64)
        metrics.update({
            "alignment_rotation": reg["A"].tolist(),
            "alignment_mirror": bool(reg["mirror"]),
            "rotation_error_frobenius_sq_median": float(np.median(reg["frobenius_sq"])),
            "rotation_error_deg_median": float(np.median(reg["angle_deg"])),
            "rotation_error_deg_mean": float(np.mean(reg["angle_deg"])),
            "fraction_within_10deg": float(np.mean(reg["angle_deg"] <= 10)),
        })
        per_particle["rotation_error_deg"] = reg["angle_deg"]
        aligned = align_volume(volume, reg["A"], reg["mirror"])
    if truth_volume is not None and pred_rotations is not None and true_rotations is not None:
        # The map is also defined up to a translation: register it (integer voxels).
        aligned, shift = register_translation(aligned, truth_volume)
        metrics["alignment_translation_px"] = [float(v) for v in shift[::-1]]  # (x, y, z)
    if pred_shifts_a is not None and true_shifts_a is not None:
        pred_sh = np.asarray(pred_shifts_a, dtype=np.float64)
        true_sh = np.asarray(true_shifts_a, dtype=np.float64)
        raw = np.linalg.norm(pred_sh - true_sh, axis=1)
        metrics["shift_error_a_median_unaligned"] = float(np.median(raw))
        err = raw
        if true_rotations is not None:
            t_a, err = align_shifts(pred_sh, true_sh, true_rotations)
            metrics["alignment_shift_translation_a"] = t_a.tolist()
        metrics["shift_error_a_median"] = float(np.median(err))
        metrics["shift_error_px_median"] = float(np.median(err) / pixel_size_a)
        per_particle["shift_error_a"] = err
    if truth_volume is not None:
        metrics.update(fsc_report(aligned, truth_volume, pixel_size_a))
    return {"metrics": metrics, "per_particle": per_particle, "aligned_volume": aligned}
