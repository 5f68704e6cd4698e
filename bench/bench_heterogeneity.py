"""A mixture of different complexes: the default run with ``--classes K`` against the single-class
run, class accuracy, each class's map against its complex's known-pose map, pose errors per class.

The mixture (``cryoai simulate`` with several ``--map``): the embedded 70S ribosome (64 px, 5 A),
the TRPV1 channel of ../shared/data/maps resampled to 5 A and padded to 64 px, and the cryoDRGN
synthetic hand map of ../shared/data/maps read at 5 A, each scaled to the ribosome's standard
deviation; shares ``--shares`` (50/30/20), ``--n`` particles at ``--snr-db``.

For each complex: the known-pose map (``cryoai train --poses`` on its own particles, as the
truth poses them), its FSC=0.5 against its true map; then ``cryoai train --classes K`` and the
single-class run on the whole mixture, evaluated with ``cryoai evaluate --gt-states``.

Example:
  python bench/bench_heterogeneity.py --outdir /tmp/bench-het --n 6000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from scipy.ndimage import zoom

from cryoai.assets import embedded_map_path
from cryoai.cli.main import main as cli
from cryoai.io import read_volume, write_volume

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
#: The complexes' point groups (the TRPV1 channel is C4): pose errors to the nearest equivalent.
SYMMETRY = ("C1", "C4", "C1")


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(f"failed ({code}): cryoai {' '.join(args)}")
    return time.perf_counter() - t0


def maps(outdir: Path) -> list[Path]:
    """The three complexes at 64 px and 5 A (module docstring)."""
    ribosome, pixel_a = read_volume(str(embedded_map_path()))
    trpv1, trpv1_a = read_volume(str(SHARED / "maps" / "cryojax_trpv1_volume_48px_4.88A.mrc"))
    hand, _ = read_volume(str(SHARED / "maps" / "cryodrgn_hand-vol_SYNTHETIC_64px.mrc"))
    small = zoom(trpv1.astype(np.float64), trpv1_a / pixel_a, order=3)
    padded = np.zeros((64, 64, 64))
    lo = (64 - small.shape[0]) // 2
    padded[lo:lo + small.shape[0], lo:lo + small.shape[1], lo:lo + small.shape[2]] = small
    paths = []
    for name, volume in (("ribosome", ribosome), ("trpv1", padded), ("hand", hand)):
        v = volume.astype(np.float32)
        path = outdir / f"{name}.mrc"
        write_volume(path, v / v.std() * ribosome.std(), pixel_a)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--n", type=int, default=15000)
    p.add_argument("--shares", default="0.5,0.3,0.2")
    p.add_argument("--snr-db", type=float, default=-10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    paths = maps(out)
    sim = out / "sim"
    if not (sim / "truth.csv").exists():  # (a set already simulated in OUTDIR is kept)
        run(["simulate", "--map", *map(str, paths), "--shares", args.shares, "--n", str(args.n), "--snr-db",
             str(args.snr_db), "--shift-sigma-a", "5", "--seed", str(args.seed + 1), "--outdir", str(sim),
             "--force", "--quiet"])
    truth = pd.read_csv(sim / "truth.csv")
    blocks = starfile.read(sim / "particles.star")
    known = []
    for k in range(1, len(paths) + 1):  # each complex's known-pose map
        mine = truth["state"].to_numpy() == k
        sub = {**blocks, "particles": blocks["particles"][mine].reset_index(drop=True)}
        star = sim / f"state_{k}.star"
        starfile.write(sub, star)
        run_dir = out / f"known-{k}"
        # (the reconstruction at the true poses, and the default run's short decoder polish)
        run(["train", str(star), "--poses", str(star), "--outdir", str(run_dir), "--max-epochs", "2",
             "--quiet", "--force"])
        ev = out / f"known-{k}-eval"
        run(["evaluate", "--map", str(run_dir / "volume.mrc"),
             "--gt-map", str(sim / f"ground_truth_state_{k:03d}.mrc"), "--outdir", str(ev)])
        known.append(json.loads((ev / "metrics.json").read_text())["resolution_px_0.5"])
    rows = {}
    for k_classes in (len(paths), 1):
        run_dir = out / f"classes-{k_classes}"
        seconds = run(["train", str(sim / "particles.star"), "--classes", str(k_classes),
                       "--outdir", str(run_dir), "--seed", str(args.seed), "--quiet", "--force"])
        row: dict = {"classes": k_classes, "minutes": seconds / 60}
        if k_classes > 1:
            ev = out / f"classes-{k_classes}-eval"
            class_maps = [str(run_dir / f"class_{c:03d}.mrc") for c in range(1, k_classes + 1)]
            state_maps = [str(sim / f"ground_truth_state_{k:03d}.mrc") for k in range(1, len(paths) + 1)]
            run(["evaluate", "--map", str(run_dir / "volume.mrc"), "--poses", str(run_dir / "poses.star"),
                 "--gt-poses", str(sim / "particles.star"), "--gt-states", str(sim / "truth.csv"),
                 "--class-maps", *class_maps, "--gt-state-maps", *state_maps, "--state-symmetry", *SYMMETRY,
                 "--outdir", str(ev)])
            c = json.loads((ev / "metrics.json").read_text())["classes"]
            row["accuracy"] = c["accuracy"]
            row["per_class"] = [{**r, "known_fsc05_px": known[r["state"] - 1],
                                 "over_known": r["resolution_px_0.5"] / known[r["state"] - 1]}
                                for r in c.get("per_class", [])]
        else:  # the single map against each complex's truth, and the poses of each complex's particles
            per_state = []
            for k in range(1, len(paths) + 1):
                ev = out / f"single-state-{k}-eval"
                star = sim / f"state_{k}.star"
                posed = starfile.read(run_dir / "poses.star")
                mine = truth["state"].to_numpy() == k
                sub = {**posed, "particles": posed["particles"][mine].reset_index(drop=True)}
                starfile.write(sub, out / f"single-state-{k}.star")
                run(["evaluate", "--map", str(run_dir / "volume.mrc"),
                     "--poses", str(out / f"single-state-{k}.star"), "--gt-poses", str(star),
                     "--symmetry", SYMMETRY[k - 1], "--outdir", str(ev)])
                m = json.loads((ev / "metrics.json").read_text())
                per_state.append({"state": k, "rotation_error_deg_median": m["rotation_error_deg_median"]})
            row["per_state"] = per_state
        rows[k_classes] = row
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
