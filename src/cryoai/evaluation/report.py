"""A self-contained HTML page about a training run: summary, the map in 3D, FSC, search, poses,
errors, config.

:func:`build_report` reads what ``cryoai train`` wrote in a run directory (``train_log.jsonl``,
``fsc_log.jsonl``, ``volume.mrc``, ``volume_half1/2.mrc``, ``poses.star``, ``config.yaml``,
``outputs.json``), optionally compares with a ground truth, writes the plots as PNG files and
an HTML page that embeds them (base64), so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..io import load_particles, read_stack_images, read_volume, write_json_atomic, write_text_atomic
from ..io.star import read_star_columns
from ..physics.fsc import fsc, resolution_px
from ..physics.masks import MAP_MASK_RADIUS_FRAC, map_mask_radius_px
from ..simulate.views import sampling_compensation_factor
from . import plots
from .metrics import evaluate
from .view3d import map_levels, shown_map, view3d_html, write_chimerax_script


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def _half_map_fsc(run: Path) -> np.ndarray | None:
    """FSC of the run's half maps as written. They are already masked by the reconstruction
    (:func:`cryoai.reconstruction.reconstruct`, the map mask), so this is the same curve as the
    run's own ``half_map_fsc_0.143_px`` in ``train_log.jsonl``: one definition, one key.
    """
    h1, h2 = run / "volume_half1.mrc", run / "volume_half2.mrc"
    if not (h1.exists() and h2.exists()):
        return None
    a, _ = read_volume(h1)
    b, _ = read_volume(h2)
    if a.shape != b.shape:
        raise InputError(f"{h2}: box {b.shape} differs from {h1} {a.shape}")
    return fsc(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


def build_report(run_dir: str | Path, outdir: str | Path | None = None, *, gt_map: str | None = None,
                 gt_poses: str | None = None, datadir: str | None = None,
                 preferred_views_scf: float) -> Path:
    """Write ``report.html`` and its PNG files for the run in ``run_dir``.

    Parameters
    ----------
    run_dir : a ``cryoai train`` output directory (needs ``volume.mrc``).
    outdir : where the page and the PNGs go (default ``run_dir/report``).
    gt_map : optional ground-truth map (.mrc): FSC against it, map aligned to it.
    gt_poses : optional ground-truth poses (.star/.cs): rotation and shift error histograms.
    datadir : where to look for image stacks named in the STAR files (not read, only resolved).
    preferred_views_scf : the SCF* below which the views are said to be preferred (the run's
        policy: its config.yaml's value is used where it has one).

    Returns
    -------
    Path of the HTML page.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: run directory not found")
    vol_path = run / "volume.mrc"
    if not vol_path.exists():
        raise InputError(f"{run}: no volume.mrc (not a cryoai train run directory?)")
    out = Path(outdir) if outdir is not None else run / "report"
    volume, pixel_size_a = read_volume(vol_path)
    box = volume.shape[-1]
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    mask_px = map_mask_radius_px(box, MAP_MASK_RADIUS_FRAC)  # the run's map mask (its config's)
    if config_text:
        import yaml

        config = yaml.safe_load(config_text) or {}
        mask_px = map_mask_radius_px(box, float(config.get("mask_radius_frac", MAP_MASK_RADIUS_FRAC)))
        policy = config.get("policy") or {}
        preferred_views_scf = float(policy.get("preferred_views_scf", preferred_views_scf))
    outputs = json.loads((run / "outputs.json").read_text()) if (run / "outputs.json").exists() else {}
    log = _read_jsonl(run / "train_log.jsonl")
    # Only FSCs of maps in the reference's frame (known poses) mean something over time.
    fsc_log = [r for r in _read_jsonl(run / "fsc_log.jsonl") if r.get("aligned_to_reference")]

    poses_path = run / "poses.star"
    pred = load_particles(poses_path, datadir=datadir) if poses_path.exists() else None
    if pred is not None and not pred.has_poses:
        pred = None
    truth = None
    if gt_map:
        truth, _ = read_volume(gt_map)
        if truth.shape != volume.shape:
            raise InputError(f"{gt_map}: box {truth.shape} differs from {vol_path} {volume.shape}")
    true_table = load_particles(gt_poses, datadir=datadir) if gt_poses else None
    if true_table is not None:
        if not true_table.has_poses:
            raise InputError(f"{gt_poses}: no poses (rlnAngleRot/Tilt/Psi) in the file")
        if pred is None:
            raise InputError(f"{run}: no poses.star to compare with {gt_poses}")
        if len(true_table) != len(pred):
            raise InputError(f"{gt_poses}: {len(true_table)} particles, but {poses_path} has {len(pred)}")

    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, str]] = []  # (title, file name, caption)
    metrics: dict = {}

    # The search's convergence (the run), else the fit's curves (amortized and --poses runs).
    searches = [r for r in log if r.get("stage") == "search" and r.get("em_posterior")]
    if searches:
        plots.plot_search_convergence(searches, out / "search.png")
        figures.append(("Search convergence", "search.png",
                        "Per EM iteration of each attempt of the search: how sharply the images pick a "
                        "pose (their mean maximum posterior; solid) and the band it was scored in "
                        "(dashed), with the share of the images' signal each attempt's map explains "
                        "(a right map about 100%)."))
    loss_recs = [r for r in log if "loss" in r and "step" in r]
    if (loss_recs or fsc_log) and not searches:
        plots.plot_training_curves(np.array([r["step"] for r in loss_recs]),
                                   np.array([r["loss"] for r in loss_recs]), out / "curves.png",
                                   np.array([r["minutes"] for r in fsc_log]),
                                   np.array([r["fsc_0.5_px"] for r in fsc_log]) if fsc_log else None,
                                   pixel_size_a)
        figures.append(("Training curves", "curves.png",
                        "Loss per logged step; FSC=0.5 resolution against --ground-truth over time "
                        "when it was given to cryoai train."))

    # Evaluation against the truth, then FSC curves.
    curves: dict[str, np.ndarray] = {}
    shown = volume
    per_particle: dict = {}
    if truth is not None or true_table is not None:
        res = evaluate(volume, pixel_size_a, truth_volume=truth,
                       pred_rotations=pred.rotations if true_table is not None else None,
                       true_rotations=true_table.rotations if true_table is not None else None,
                       pred_shifts_a=pred.shifts_a if true_table is not None and pred.has_shifts else None,
                       true_shifts_a=(true_table.shifts_a if true_table is not None and true_table.has_shifts
                                      else None),
                       symmetry=outputs.get("symmetry", "C1"))
        metrics.update({k: v for k, v in res["metrics"].items() if k != "fsc"})
        per_particle = res["per_particle"]
        shown = res["aligned_volume"]
        if "fsc" in res["metrics"]:
            curves["map vs ground truth"] = np.asarray(res["metrics"]["fsc"])
    half = _half_map_fsc(run)
    if half is not None:
        curves["half map 1 vs 2 (masked by the reconstruction)"] = half
        metrics["half_map_fsc_0.143_px"] = resolution_px(torch.as_tensor(half), 0.143)
        metrics["half_map_fsc_0.143_a"] = metrics["half_map_fsc_0.143_px"] * pixel_size_a
    if curves:
        thresholds = {label: 0.5 if "ground truth" in label else 0.143 for label in curves}
        plots.plot_fsc_curves(curves, box, pixel_size_a, out / "fsc.png", thresholds=thresholds)
        figures.append(("Fourier shell correlation", "fsc.png",
                        "Between the two half maps (crossing 0.143 marked) and against the ground truth "
                        "after alignment (crossing 0.5 marked), against spatial frequency; the top axis "
                        "reads resolution in Angstrom. Dashed 0.5, dotted 0.143."))

    if (run / "class_averages.mrcs").exists():
        sizes = next((r["sizes"] for r in reversed(log) if r.get("stage") == "class_averages"), None)
        averages = read_stack_images(run / "class_averages.mrcs")
        plots.plot_class_averages(averages, sizes, out / "class_averages.png")
        figures.append(("2D class averages", "class_averages.png",
                        f"The {len(averages)} class averages the search started from (largest first, "
                        "each titled with its number of images; classes of under 10 were not used): "
                        "they should look like views of one molecule, and junk gathers in classes "
                        "of its own."))

    plots.plot_map_slices(shown, out / "map.png",
                          title="map aligned to the ground truth" if shown is not volume else "map")
    figures.append(("Map", "map.png", "Central slices (top) and projections (bottom) along z, y, x."))
    # The maps in 3D (interactive, offline; the 3D classes in its menu), static isosurface views
    # for print, and a ChimeraX script beside the map at the same level.
    resolution_a = metrics.get("half_map_fsc_0.143_a")
    _, level = map_levels(volume)
    if os.access(run, os.W_OK):
        write_chimerax_script(run / "volume.cxc", vol_path.name, level)
    metrics["map_level_chimerax"] = level
    view_maps = [("map", volume)]
    # First among the figures, under the 3D view: the map's isosurface for print.
    figures.insert(0, _isosurface_figure(volume, "map", pixel_size_a, resolution_a, mask_px,
                                         out / "isosurface.png",
                                         "The map's isosurface at 3 standard deviations of the solvent, "
                                         "seen down z, y and x (the view above, for print)."))

    for info in outputs.get("classes", []):  # --classes K: each class's map, largest first
        path = run / info["map"]
        if not path.exists():
            continue
        class_map, _ = read_volume(path)
        if class_map.shape != volume.shape:
            raise InputError(f"{path}: box {class_map.shape} differs from {vol_path} {volume.shape}")
        k = info["class"]
        name = f"class_{k:03d}.png"
        plots.plot_map_slices(class_map, out / name, title=f"3D class {k}")
        share = info["particles"] / max(len(pred), 1) if pred is not None else float("nan")
        said = (f"{info['particles']} particles ({share:.0%}), {info['junk_called']} of them called junk; "
                f"half-map FSC=0.143 at {info['resolution_a']:.1f} A ({info['map']}; rlnClassNumber {k} "
                "in poses.star)")
        figures.append((f"3D class {k}", name, said + ": central slices and projections."))
        view_maps.append((f"3D class {k}", class_map))
        figures.append(_isosurface_figure(class_map, f"3D class {k}", pixel_size_a, info["resolution_a"],
                                          mask_px, out / f"class_{k:03d}_isosurface.png",
                                          f"3D class {k}'s isosurface at 3 standard deviations of "
                                          f"its solvent: {said}."))
        metrics[f"class_{k}_particles"] = info["particles"]
        metrics[f"class_{k}_resolution_a"] = info["resolution_a"]
    view = view3d_html(view_maps, pixel_size_a, resolution_a, mask_px)

    if pred is not None:
        columns = particle_columns(poses_path)
        if "rlnCryoaiJunk" in columns:
            kept = columns["rlnCryoaiJunk"] == 0
        elif "rlnClassNumber" in columns and "rlnCryoaiScore" in columns:  # before rlnCryoaiJunk
            kept = columns["rlnClassNumber"] == 1
        else:
            kept = np.ones(len(pred), bool)
        scf = sampling_compensation_factor(pred.rotations[kept])
        metrics["views_scf"] = scf
        plots.plot_viewing_directions(pred.rotations[kept], out / "viewing_directions.png")
        note = (f" SCF* {scf:.2f}: below {preferred_views_scf:g}, the views leave directions of Fourier "
                "space undersampled and the map's resolution is anisotropic (smeared along them)."
                if scf < preferred_views_scf else
                f" SCF* {scf:.2f} ({preferred_views_scf:g} or more: sampled well enough).")
        figures.append(("Viewing directions", "viewing_directions.png",
                        "Sky map (Mollweide, equal-area cells) of the projection directions of the "
                        "particles kept." + note))
        if "rlnCryoaiScore" in columns:
            metrics["junk_particles"] = int((~kept).sum())
            metrics["junk_fraction"] = float((~kept).mean())
            plots.plot_particle_scores(columns["rlnCryoaiScore"], kept, out / "particle_scores.png")
            figures.append(("Particle scores", "particle_scores.png",
                            "Each particle's score against the map at its pose (poses.star: "
                            "rlnCryoaiScore); junk (rlnCryoaiJunk 1) is what lies far from the "
                            "particles' cluster of amplitude and unexplained power."))
    analysis = run / "analyze"
    if (analysis / "analyze.json").exists():  # cryoai analyze's latent space (--latent-dim runs)
        import shutil

        summary = json.loads((analysis / "analyze.json").read_text())
        determined = ", ".join(f"z{k + 1} {v:.2f}" for k, v in enumerate(summary.get("determined", [])))
        for name, title, caption in (
                ("latent.png", "Latent space", f"Each particle's latent vector ({summary.get('dim')} "
                 f"dimensions, in standard deviations of the particles' spread; the share of each "
                 f"dimension's spread the images determine: {determined})."),
                ("pc1.png", "Maps along z1", "Projections of the maps along the direction in which the "
                 "particles' maps change most (analyze/pc1/map_NN.mrc, a volume series for ChimeraX)."),
                ("pc2.png", "Maps along z2", "The same along the second direction (analyze/pc2/).")):
            if (analysis / name).exists():
                shutil.copyfile(analysis / name, out / f"latent_{name}")
                figures.append((title, f"latent_{name}", caption))
    if "rotation_error_deg" in per_particle:
        plots.plot_rotation_errors(per_particle["rotation_error_deg"], out / "rotation_errors.png")
        figures.append(("Rotation errors", "rotation_errors.png",
                        "After the global alignment of the predicted rotations to the true ones."))
    if "shift_error_a" in per_particle:
        plots.plot_shift_errors(per_particle["shift_error_a"], out / "shift_errors.png")
        figures.append(("Shift errors", "shift_errors.png", "Distance between predicted and true shifts."))

    attempt_starts = {}  # the search's attempts: where each started
    for r in log:  # the time of each stage (the last record of each, after resumes)
        if r.get("stage") == "search":
            metrics["search_minutes"] = r.get("search_seconds", 60 * r.get("minutes", 0)) / 60
            attempt_starts[r.get("attempt")] = r.get("start")
        elif r.get("stage") == "search_done" and r.get("kept_attempt") is not None:
            # which attempt the run kept (a blob's can be kept over doubtful class averages')
            kept = r["kept_attempt"]
            metrics["search_kept"] = f"attempt {kept} of {r.get('attempts')} ({attempt_starts.get(kept)})"
        elif r.get("stage") in ("encoder", "assignment", "reconstruction", "fit") and "seconds" in r:
            metrics[f"{r['stage']}_minutes"] = r["seconds"] / 60
        if r.get("stage") == "encoder":  # the pose encoder against the search on held-out particles
            for key in ("top1_median_deg", "hypothesis_hit_rate", "amortized_agreement", "global_agreement",
                        "amortized_fraction", "combined_agreement", "used"):
                if f"check_{key}" in r:
                    metrics[f"encoder_{key}"] = r[f"check_{key}"]
        elif r.get("stage") == "search_plan":  # what the search used, and where it came from
            metrics.update({"search_particles": r.get("subset"), "search_start": r.get("start"),
                            "search_batch": r.get("batch"),
                            "search_band_px": f"{r.get('band_start_px', 0):g} -> "
                                              f"{r.get('band_end_px', 0):g}"})
        elif r.get("stage") == "balanced_views":  # the subset's poses refined against balanced maps
            metrics.update({"balanced_views_rounds": r.get("rounds"),
                            "balanced_views_minutes": r.get("seconds", 0.0) / 60,
                            "balanced_views_effective_particles": r.get("effective_particles")})
        elif r.get("stage") == "symmetry":  # --sym: the group asked, imposed, and how well it holds
            metrics.update({"symmetry_asked": r.get("asked"), "symmetry_imposed": r.get("imposed")})
            if r.get("agreement"):
                metrics["symmetry_worst_operator_agreement"] = min(r["agreement"][1:], default=1.0)
            if r.get("proposed"):
                metrics["symmetry_proposed"] = r["proposed"]
        elif r.get("stage") == "assignment" and r.get("particles"):
            metrics.update({"assignment_particles": r["particles"],
                            "assignment_by_encoder": r.get("amortized"),
                            "assignment_images_per_s": r.get("images_per_s")})
    metrics.update({k: outputs[k] for k in ("steps", "minutes", "images_seen") if k in outputs})
    times = _stage_seconds(log)
    if times:
        plots.plot_stage_times(times, out / "times.png")
        figures.append(("Time per stage", "times.png", "Seconds of each stage of the run (the last run of "
                        "each, after a resume)."))
    summary = _summary(metrics, outputs, pred, box, pixel_size_a)
    metrics["warnings"] = list(outputs.get("warnings", []))
    write_json_atomic(out / "report.json", metrics)
    page = _html(run, figures, metrics, config_text, out, box, pixel_size_a, summary, metrics["warnings"],
                 view)
    path = out / "report.html"
    write_text_atomic(path, page)
    return path


def _isosurface_figure(volume: np.ndarray, name: str, pixel_size_a: float, resolution_a: float | None,
                       mask_radius_px: float, path: Path, caption: str) -> tuple[str, str, str]:
    """Static isosurface views of a map as the 3D view shows it (cropped, low-passed to
    ``resolution_a``, under the run's mask, at 3 sd of its solvent): the report's figure record.
    """
    shown, voxel_a, _, level = shown_map(volume, pixel_size_a, resolution_a, mask_radius_px)
    plots.plot_isosurface_views(shown, level, path, title=f"{name}, isosurface at 3 sd", voxel_a=voxel_a)
    return (f"{name[0].upper()}{name[1:]}: isosurface", path.name, caption)


def particle_columns(path: Path) -> dict[str, np.ndarray]:
    """The junk and class stages' columns of a run's poses.star (``rlnClassNumber``,
    ``rlnCryoai*``), those present (read by cryoai's own STAR reader, only those columns).
    """
    return read_star_columns(path, lambda label: label == "rlnClassNumber" or label.startswith("rlnCryoai"))


#: The stages timed in the report, in the run's order, and their names there.
_STAGES = (("noise", "noise model", "noise_seconds"), ("search", "search", "search_seconds"),
           ("balanced_views", "view balancing", "seconds"), ("encoder", "pose encoder", "seconds"),
           ("assignment", "assignment", "seconds"), ("junk", "junk", "seconds"),
           ("reconstruction", "reconstruction", "seconds"), ("classes", "3D classes", "seconds"),
           ("latent", "latent model", "seconds"), ("fit", "polish", "seconds"))


def _stage_seconds(log: list[dict]) -> dict[str, float]:
    """Seconds per stage from train_log.jsonl (the search's attempts added; the junk stage's
    time taken out of the reconstruction's, which holds it).
    """
    out: dict[str, float] = {}
    for stage, name, key in _STAGES:
        records = [r for r in log if r.get("stage") == stage and isinstance(r.get(key), (int, float))]
        if stage == "search":
            value = sum(r[key] for r in records)
        else:
            value = records[-1][key] if records else None
        if records and value is not None:
            out[name] = float(value)
    if "junk" in out and "reconstruction" in out:
        out["reconstruction"] = max(out["reconstruction"] - out["junk"], 0.0)
    return out


def _summary(metrics: dict, outputs: dict, pred, box: int, pixel_size_a: float) -> list[tuple[str, str]]:
    """The report's first box: what a biologist reads first, in words and Angstrom."""
    rows = []
    res = metrics.get("half_map_fsc_0.143_a")
    if res is not None:
        limit_px = box / (box // 2 - 1)
        said = f"{res:.1f} A (half maps, FSC = 0.143)"
        if metrics["half_map_fsc_0.143_px"] <= limit_px + 1e-6:
            said += (f": limited by the box (the finest the maps hold at {pixel_size_a:.3g} A per pixel); "
                     "finer pixels could go further")
        rows.append(("Resolution", said))
    if metrics.get("resolution_a_0.5") is not None:
        rows.append(("Against the ground truth", f"{metrics['resolution_a_0.5']:.1f} A (FSC = 0.5)"
                     + (f"; poses {metrics['rotation_error_deg_median']:.2f} deg off (median)"
                        if metrics.get("rotation_error_deg_median") is not None else "")))
    if pred is not None:
        junk = metrics.get("junk_particles")
        kept = "" if junk is None else f": {len(pred) - junk:,} in the map, {junk:,} called junk"
        rows.append(("Particles", f"{len(pred):,}{kept}"))
    if outputs.get("search_explained_signal") is not None:
        rows.append(("Search", f"{metrics.get('search_kept', 'kept')}; its map explains "
                               f"{outputs['search_explained_signal']:.0%} of the images' signal "
                               "(a right map about 100%)"))
    if metrics.get("views_scf") is not None:
        rows.append(("Views", f"SCF* {metrics['views_scf']:.2f} (1: uniform; below 0.81 preferred)"))
    imposed = outputs.get("symmetry", "C1")
    asked = metrics.get("symmetry_asked")
    if imposed != "C1":
        worst = metrics.get("symmetry_worst_operator_agreement")
        rows.append(("Symmetry", f"{imposed} imposed; map and poses in RELION's frame for it"
                     + (f" (its operators agree at least {worst:.2f} as well as the half maps)"
                        if worst is not None else "")))
    elif asked == "AUTO":
        proposed = metrics.get("symmetry_proposed", "C1")
        rows.append(("Symmetry", "C1: --sym auto found no group in the map" if proposed == "C1" else
                     f"C1 imposed; --sym auto proposes {proposed} (run again with --sym {proposed})"))
    elif asked not in (None, "C1"):
        rows.append(("Symmetry", f"C1: --sym {asked} was asked, but the data do not support it "
                                 "(see the warnings)"))
    else:
        rows.append(("Symmetry", "C1 (none imposed)"))
    if outputs.get("minutes") is not None:
        rows.append(("Time", f"{outputs['minutes']:.1f} minutes"))
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return html.escape(f"{len(v)} values") if len(str(v)) > 80 else html.escape(", ".join(map(str, v)))
    return html.escape(str(v))


_STYLE = """<style>
body { font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; } .cap { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 2px 10px; border-bottom: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.summary th { width: 11em; } .summary { font-size: 1.05em; margin-bottom: 0.8em; }
.warn { background: #fff4e0; border-left: 4px solid #e08a00; padding: 0.5em 1em; }
.ok { background: #eef7ee; border-left: 4px solid #3a9a3a; padding: 0.5em 1em; }
</style>"""


def write_page(path: str | Path, title: str, body: str) -> Path:
    """A plain HTML page in the report's style: ``title`` (escaped) and ``body`` (HTML), written
    atomically (e.g. ``cryoai analyze``'s page, whose figures sit beside it).
    """
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n"
            f"{_STYLE}</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>Written {when} by cryoai {html.escape(__version__)}.</p>\n{body}\n</body></html>\n")
    write_text_atomic(Path(path), page)
    return Path(path)


def _html(run: Path, figures, metrics: dict, config_text: str, out: Path, box: int,
          pixel_size_a: float, summary: list[tuple[str, str]], warnings: list[str], view: str) -> str:
    def img(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'

    rows = "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{_fmt(v)}</td></tr>"
                   for k, v in metrics.items() if k != "warnings")
    box_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    warned = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    warned = (f'<div class="warn" id="warnings"><b>Warnings</b><ul>{warned}</ul></div>' if warnings else
              '<div class="ok" id="warnings">No warnings.</div>')
    sections = "".join(
        f'<section><h2>{html.escape(title)}</h2>{img(name)}<p class="cap">{html.escape(cap)} '
        f'(<a href="{html.escape(name)}">{html.escape(name)}</a>)</p></section>'
        for title, name, cap in figures)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cryoai report: {html.escape(run.name)}</title>
{_STYLE}</head>
<body>
<h1>cryoai report: {html.escape(str(run))}</h1>
<p>Box {box} px, pixel size {pixel_size_a:.3f} A. Written {when} by cryoai {html.escape(__version__)}.</p>
<section><h2>Summary</h2><table id="summary" class="summary">{box_rows}</table>{warned}</section>
<section><h2>Map in 3D</h2>{view}<p class="cap">The map's isosurface (drag to turn, scroll to zoom),
low-passed to its resolution and under the run's mask; the slider sets the level in standard
deviations of the solvent (the corners of the box) above its mean; the menu, where there are 3D
classes, picks the map. For print: the isosurface views and slices below.
<code>chimerax volume.cxc</code>, from the run folder, opens the map at the same level.</p></section>
{sections}
<section><h2>All figures</h2><table id="metrics">{rows}</table></section>
<section><h2>Configuration</h2>
<pre id="config">{html.escape(config_text) or "(no config.yaml)"}</pre></section>
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images-ok", String(imgs.length > 0 && imgs.every(function (i) {{
    return i.complete && i.naturalWidth > 0; }})));
  document.body.setAttribute("data-image-count", String(imgs.length));
}});
</script>
</body></html>
"""
