"""Evaluate a reconstruction against a ground-truth map and poses.

Aligns the predicted rotations to the true ones (orthogonal Procrustes, mirror tried),
resamples the map by that transform, and reports the FSC (resolution at 0.5 and 0.143 in px
and A), the median rotation error (squared Frobenius and degrees) and the shift error.
Writes OUTDIR/metrics.json, fsc.png, rotation_errors.png and aligned_volume.mrc.

Several structures (a simulation's truth.csv with a state per particle, --gt-states): the
classes of --poses (rlnClassNumber) against the true states, matched one to one (the Hungarian
method): the class accuracy and the confusion counts; with --class-maps and --gt-state-maps,
each matched class's map against its state's (FSC) and its particles' pose errors.

A continuous latent model (a run's latent.npz, --latent) with --gt-states and --gt-state-maps:
CryoBench's per-image FSC-AUC, each sampled particle's own map (at its latent vector) against
its true state's map, beside the same measure for the consensus map alone.

Example: cryoai evaluate --map run/volume.mrc --poses run/poses.star \
             --gt-map sim/ground_truth.mrc --gt-poses sim/particles.star --outdir run/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", required=True, help="reconstructed map (.mrc)")
    parser.add_argument("--poses", default=None, help="predicted poses (.star/.cs)")
    parser.add_argument("--gt-map", default=None, help="ground-truth map (.mrc)")
    parser.add_argument("--gt-poses", default=None, help="ground-truth poses (.star/.cs)")
    parser.add_argument("--outdir", required=True, help="where metrics.json and the plots go")
    parser.add_argument("--datadir", default=None)
    parser.add_argument("--gt-states", default=None,
                        help="truth.csv of a simulation of several maps (its state column): the class "
                             "accuracy of --poses' rlnClassNumber")
    parser.add_argument("--class-maps", nargs="+", default=None,
                        help="the classes' maps (class_001.mrc ...), in class order, to compare with "
                             "--gt-state-maps")
    parser.add_argument("--gt-state-maps", nargs="+", default=None,
                        help="each true state's map (ground_truth_state_001.mrc ...), in state order")
    parser.add_argument("--latent", default=None,
                        help="a run's latent.npz (--latent-dim): with --gt-states and --gt-state-maps, the "
                             "per-image FSC-AUC of the particles' own maps against their true states'")
    parser.add_argument("--latent-images", type=int, default=200,
                        help="with --latent: particles sampled (evenly over the set) for the per-image "
                             "FSC-AUC (default 200)")
    parser.add_argument("--symmetry", default="C1",
                        help="the truth's point group: Cn, Dn, T, O or I1-I4 (RELION's settings): rotation "
                             "errors are to the nearest symmetry-equivalent true pose (default C1)")
    parser.add_argument("--state-symmetry", nargs="+", default=None,
                        help="each true state's point group, in state order (the classes' pose errors and "
                             "map alignment to the nearest equivalent; default: --symmetry for every state)")


def run_evaluation(map_path, outdir, *, poses=None, gt_map=None, gt_poses=None, datadir=None,
                   symmetry: str = "C1", gt_states=None, class_maps=None, gt_state_maps=None,
                   state_symmetry: list[str] | None = None, latent=None, latent_images: int = 200) -> dict:
    from ..evaluation.metrics import evaluate
    from ..evaluation.plots import plot_fsc, plot_map_slices, plot_rotation_errors
    from ..io import load_particles, write_json_atomic
    from ..io.mrc import read_volume, write_volume
    from ..physics.symmetry import point_group

    for group in [symmetry, *(state_symmetry or [])]:
        point_group(group)  # a bad symbol is said before anything is read
    volume, pixel_size_a = read_volume(map_path)
    truth = None
    if gt_map:
        truth, gt_pixel = read_volume(gt_map)
        if truth.shape != volume.shape:
            raise InputError(f"{gt_map}: box {truth.shape} differs from {map_path} {volume.shape}")
        pixel_size_a = pixel_size_a or gt_pixel
    pred_rot = true_rot = pred_sh = true_sh = None
    if poses and gt_poses:
        p = load_particles(poses, datadir=datadir)
        t = load_particles(gt_poses, datadir=datadir)
        if len(p) != len(t):
            raise InputError(f"{poses}: {len(p)} particles, but {gt_poses} has {len(t)}")
        if not p.has_poses:
            raise InputError(f"{poses}: no poses (rlnAngleRot/Tilt/Psi) in the file")
        if not t.has_poses:
            raise InputError(f"{gt_poses}: no poses (rlnAngleRot/Tilt/Psi) in the file")
        pred_rot, true_rot = p.rotations, t.rotations
        if p.has_shifts and t.has_shifts:
            pred_sh, true_sh = p.shifts_a, t.shifts_a
    result = evaluate(volume, pixel_size_a, truth_volume=truth, pred_rotations=pred_rot,
                      true_rotations=true_rot, pred_shifts_a=pred_sh, true_shifts_a=true_sh,
                      symmetry=symmetry)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    metrics = result["metrics"]
    if latent:
        if not (gt_states and gt_state_maps):
            raise InputError("--latent needs --gt-states (truth.csv) and --gt-state-maps")
        metrics["latent"] = latent_evaluation(latent, gt_states, gt_state_maps, metrics, latent_images)
    if gt_states and not latent:  # (with --latent, the states score the latent model, not classes)
        if not poses:
            raise InputError("--gt-states needs --poses (a run's poses.star, with rlnClassNumber)")
        metrics["classes"] = class_evaluation(poses, gt_states, class_maps, gt_state_maps, pred_rot, true_rot,
                                              pixel_size_a, symmetry, state_symmetry)
    write_json_atomic(outdir / "metrics.json", metrics)
    if "fsc" in metrics:
        plot_fsc(np.array(metrics["fsc"]), volume.shape[-1], pixel_size_a, outdir / "fsc.png")
    if "rotation_error_deg" in result["per_particle"]:
        plot_rotation_errors(result["per_particle"]["rotation_error_deg"], outdir / "rotation_errors.png")
    write_volume(outdir / "aligned_volume.mrc", result["aligned_volume"].astype(np.float32), pixel_size_a)
    plot_map_slices(result["aligned_volume"], outdir / "map_slices.png", title="aligned map")
    return metrics


def _true_states(gt_states) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's true state (1-based) and whether it is a particle (not a junk pick)."""
    import pandas as pd

    try:
        truth = pd.read_csv(gt_states)
    except (OSError, ValueError) as exc:
        raise InputError(f"{gt_states}: not a readable CSV ({exc})") from None
    if "state" not in truth:
        raise InputError(f"{gt_states}: no state column (a simulation of several maps writes one)")
    real = (truth["kind"] == "particle").to_numpy() if "kind" in truth else np.ones(len(truth), bool)
    return truth["state"].to_numpy().astype(np.int64), real


def latent_evaluation(latent_path, gt_states, gt_state_maps, metrics: dict, n_images: int) -> dict:
    """CryoBench's per-image FSC-AUC of a latent model (module docstring), on ``n_images``
    particles spread evenly over the set (junk picks left out); each particle's map is put in the
    truth's frame by the consensus map's alignment in ``metrics`` (none with known poses).
    """
    from ..evaluation.metrics import _phase_shift_volume, align_volume, fsc_auc
    from ..io.mrc import read_volume
    from ..reconstruction.latent import read_latent

    model, background, _ = read_latent(latent_path)
    states, real = _true_states(gt_states)
    if len(states) != len(model.z):
        raise InputError(f"{gt_states}: {len(states)} particles, but {latent_path} has {len(model.z)}")
    truths = [read_volume(p)[0] for p in gt_state_maps]
    if int(states.max()) > len(truths):
        raise InputError(f"--gt-state-maps: {len(truths)} map(s) for {int(states.max())} states")
    if truths[0].shape[-1] != model.box_px:
        raise InputError(f"{gt_state_maps[0]}: box {truths[0].shape[-1]}, but the latent model's is "
                         f"{model.box_px}")
    eligible = np.flatnonzero(real & np.isfinite(model.z).all(axis=1))
    rows = eligible[np.linspace(0, len(eligible) - 1, min(n_images, len(eligible))).round().astype(int)]

    def framed(volume: np.ndarray) -> np.ndarray:
        if "alignment_rotation" in metrics:
            volume = align_volume(volume, np.asarray(metrics["alignment_rotation"]),
                                  metrics["alignment_mirror"])
        if "alignment_translation_px" in metrics:
            shift_zyx = np.asarray(metrics["alignment_translation_px"])[::-1]
            volume = np.fft.ifftn(_phase_shift_volume(np.fft.fftn(volume), shift_zyx)).real
        return volume

    consensus = framed(model.volume(np.zeros(model.dim), background))
    own, alone = [], []
    for row in rows:
        truth = truths[int(states[row]) - 1]
        own.append(fsc_auc(framed(model.volume(model.z[row], background)), truth))
        alone.append(fsc_auc(consensus, truth))
    own, alone = np.asarray(own), np.asarray(alone)
    return {"images": int(len(rows)), "fsc_auc_mean": float(own.mean()),
            "fsc_auc_median": float(np.median(own)), "consensus_fsc_auc_mean": float(alone.mean()),
            "dim": model.dim,
            "determined": [float(v) for v in model.variance]}


def class_evaluation(poses, gt_states, class_maps, gt_state_maps, pred_rot, true_rot, pixel_size_a,
                     symmetry: str, state_symmetry: list[str] | None = None) -> dict:
    """The classes against the true states (module docstring); junk picks (``truth.csv``'s
    ``kind`` other than ``particle``) left out. ``state_symmetry``: each state's point group
    (else ``symmetry`` for all).
    """
    from ..evaluation.metrics import class_accuracy, evaluate
    from ..evaluation.report import particle_columns
    from ..io.mrc import read_volume

    states, real = _true_states(gt_states)
    columns = particle_columns(Path(poses))
    if "rlnClassNumber" not in columns:
        raise InputError(f"{poses}: no rlnClassNumber (run cryoai train with --classes K)")
    classes = np.asarray(columns["rlnClassNumber"]).astype(np.int64)
    if len(classes) != len(states):
        raise InputError(f"{gt_states}: {len(states)} particles, but {poses} has {len(classes)}")
    out = class_accuracy(classes[real], states[real])
    if state_symmetry is not None and len(state_symmetry) < int(states.max()):
        raise InputError(f"--state-symmetry: {len(state_symmetry)} group(s) for {int(states.max())} states")
    if class_maps and gt_state_maps:
        per_class = []
        for c, s in sorted(out["matching"].items()):
            if not (1 <= c <= len(class_maps) and 1 <= s <= len(gt_state_maps)):
                continue
            volume, _ = read_volume(class_maps[c - 1])
            truth_map, _ = read_volume(gt_state_maps[s - 1])
            rows = np.flatnonzero(real & (classes == c) & (states == s))
            m = evaluate(volume, pixel_size_a, truth_volume=truth_map,
                         pred_rotations=None if pred_rot is None else pred_rot[rows],
                         true_rotations=None if true_rot is None else true_rot[rows],
                         symmetry=symmetry if state_symmetry is None else state_symmetry[s - 1])["metrics"]
            per_class.append({"class": c, "state": s, "particles": int((classes == c).sum()),
                              **{k: m[k] for k in ("resolution_px_0.5", "resolution_a_0.5",
                                                   "rotation_error_deg_median") if k in m}})
        out["per_class"] = per_class
    return out


def summary_lines(metrics: dict) -> list[str]:
    lines = []
    if "resolution_px_0.5" in metrics:
        for t, label in (("0.5", "FSC=0.5:  "), ("0.143", "FSC=0.143:")):
            px, a = metrics[f"resolution_px_{t}"], metrics[f"resolution_a_{t}"]
            lines.append(f"{label} {px:.2f} px = {a:.1f} A")
    if "rotation_error_deg_median" in metrics:
        lines.append(f"rotation error: median {metrics['rotation_error_deg_median']:.2f} deg "
                     f"(squared Frobenius {metrics['rotation_error_frobenius_sq_median']:.4f}), "
                     f"mirror {'yes' if metrics['alignment_mirror'] else 'no'}"
                     + (f", symmetry {metrics['symmetry']}" if metrics.get("symmetry", "C1") != "C1" else ""))
    if "shift_error_a_median" in metrics:
        lines.append(f"shift error: median {metrics['shift_error_a_median']:.2f} A")
    if "latent" in metrics:
        m = metrics["latent"]
        lines.append(f"latent model ({m['dim']} dimensions): per-image FSC-AUC {m['fsc_auc_mean']:.3f} "
                     f"(mean of {m['images']} particles; the consensus map alone "
                     f"{m['consensus_fsc_auc_mean']:.3f})")
    if "classes" in metrics:
        c = metrics["classes"]
        lines.append(f"classes: accuracy {c['accuracy']:.1%} (class -> state: "
                     + ", ".join(f"{k} -> {v}" for k, v in c["matching"].items()) + ")")
        for row in c.get("per_class", []):
            lines.append(f"  class {row['class']} (state {row['state']}, {row['particles']} particles): "
                         + (f"FSC=0.5 {row['resolution_a_0.5']:.1f} A" if "resolution_a_0.5" in row else "")
                         + (f", poses {row['rotation_error_deg_median']:.2f} deg"
                            if "rotation_error_deg_median" in row else ""))
    return lines


def main(args) -> int:
    metrics = run_evaluation(args.map, args.outdir, poses=args.poses, gt_map=args.gt_map,
                             gt_poses=args.gt_poses, datadir=args.datadir, symmetry=args.symmetry,
                             gt_states=args.gt_states, class_maps=args.class_maps,
                             gt_state_maps=args.gt_state_maps, state_symmetry=args.state_symmetry,
                             latent=args.latent, latent_images=args.latent_images)
    for line in summary_lines(metrics):
        print(line)
    print(f"metrics and plots: {args.outdir}")
    return 0
