"""The default run at the box users extract at, against the same particles Fourier-cropped to
64 px: time, peak memory and the map's resolution in Angstrom, side by side in one run.

It makes a map at ``--box`` px by Fourier-padding the embedded 70S map (64 px, 5 A: the same
320 A box at ``5 * 64 / box`` A per pixel), simulates ``--n`` particles from it as a user's
would look (micrographs, 10% junk, shifts of 10 A), at an SNR that is ``--snr-db-at-64`` once
the images are cropped to 64 px (white noise spreads over the bigger box's wider band: -6 dB
per doubling of the box), crops them to 64 px with ``cryoai downsample``, then runs
``cryoai train`` on both sets (each in its own process: its wall time and peak resident memory)
and evaluates each against its truth (FSC=0.5 in Angstrom, half-map FSC=0.143, the median pose
error of the real particles after global alignment).

Example (docs/results.md#box-sizes; about 12 minutes on 2 cores at 128 px):
  python bench/bench_box.py --outdir /tmp/bench-box --box 128 --n 5000
  python bench/bench_box.py --outdir /tmp/bench-box-256 --box 256 --n 2000 --only full
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoai.assets import embedded_map_path
from cryoai.cli.main import main as cli
from cryoai.evaluation.metrics import evaluate
from cryoai.io import load_particles, read_volume, write_volume
from cryoai.physics.fft import fft3_c, fourier_crop_3d, ifft3_c

#: Runs a cryoai command in this process and prints its peak resident memory (KiB) last.
_MEASURED = ("import resource, sys\nfrom cryoai.cli.main import main\nrc = main(sys.argv[1:])\n"
             "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")


def padded_map(box: int, out: Path) -> Path:
    """The embedded 70S map Fourier-padded to ``box`` px (same extent, finer pixels)."""
    volume, apix = read_volume(embedded_map_path())
    n = volume.shape[-1]
    f = fft3_c(torch.as_tensor(volume, dtype=torch.float64))
    big = torch.zeros((box,) * 3, dtype=f.dtype)
    lo = box // 2 - n // 2
    big[lo:lo + n, lo:lo + n, lo:lo + n] = f
    write_volume(out, (ifft3_c(big).real * (box / n) ** 3).numpy().astype(np.float32), apix * n / box)
    return out


def train(particles: Path, outdir: Path, extra: list[str]) -> dict:
    """``cryoai train`` in a process of its own: wall time and peak memory."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED, "train", str(particles), "--outdir", str(outdir),
                           "--quiet", "--no-tensorboard", "--force", *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cryoai train {particles} failed:\n{done.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak_rss_kib"))
    return {"minutes": (time.perf_counter() - t0) / 60, "peak_rss_gib": peak / 2**20}


def measure(sim: Path, run: Path, truth_csv: Path) -> dict:
    """The run's map and poses against the truth (the real particles' poses only)."""
    volume, apix = read_volume(run / "volume.mrc")
    truth, _ = read_volume(sim / "ground_truth.mrc")
    real = pd.read_csv(truth_csv)["kind"].to_numpy() == "particle" if truth_csv.exists() else None
    pred, true = load_particles(run / "poses.star"), load_particles(sim / "particles.star")
    keep = np.ones(len(true), bool) if real is None else real
    res = evaluate(volume, apix, truth_volume=truth, pred_rotations=pred.rotations[keep],
                   true_rotations=true.rotations[keep])["metrics"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    rec = next((r for r in reversed(log) if r.get("stage") == "reconstruction"), {})
    half = rec.get("half_map_fsc_0.143_px")
    return {"fsc_0.5_a": res["resolution_a_0.5"], "half_map_0.143_a": None if half is None else half * apix,
            "median_pose_error_deg": res["rotation_error_deg_median"], "pixel_size_a": apix}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--box", type=int, default=128, help="the box the particles are extracted at, px")
    p.add_argument("--n", type=int, default=5000, help="particles")
    p.add_argument("--snr-db-at-64", type=float, default=-10.0, help="the SNR of the images cropped to 64 px")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", choices=("both", "full", "64"), default="both",
                   help="which runs (full: only the run at --box, e.g. to measure its memory)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more cryoai train options")
    args = p.parse_args()
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    sim_big, sim_64 = out / f"sim{args.box}", out / "sim64"
    if not (sim_big / "particles.star").exists():
        snr_db = args.snr_db_at_64 - 20 * math.log10(args.box / 64)
        padded = padded_map(args.box, out / f"map{args.box}.mrc")
        assert cli(["simulate", "--map", str(padded), "--n", str(args.n), "--snr-db", f"{snr_db:.3f}",
                    "--shift-sigma-a", "10", "--micrographs", "--junk-fraction", "0.1", "--seed",
                    str(args.seed), "--quiet", "--outdir", str(sim_big)]) == 0
    if args.only != "full" and not (sim_64 / "particles.star").exists():
        assert cli(["downsample", str(sim_big / "particles.star"), "--box", "64", "--out",
                    str(sim_64 / "particles.star")]) == 0
        truth, apix = read_volume(sim_big / "ground_truth.mrc")
        small = fourier_crop_3d(torch.as_tensor(truth, dtype=torch.float64), 64).numpy().astype(np.float32)
        write_volume(sim_64 / "ground_truth.mrc", small, apix * args.box / 64)
    rows = {}
    for name, sim in ((f"{args.box} px", sim_big), ("64 px", sim_64)):
        if (args.only == "full" and sim is sim_64) or (args.only == "64" and sim is sim_big):
            continue
        run = out / f"run-{name.split()[0]}"
        rows[name] = {**train(sim / "particles.star", run, args.train_args),
                      **measure(sim, run, sim_big / "truth.csv")}
        print(name, json.dumps(rows[name]), flush=True)
    table = pd.DataFrame(rows).T
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    if len(rows) == 2:
        big, small = rows[f"{args.box} px"], rows["64 px"]
        print(f"time {args.box} px / 64 px: {big['minutes'] / small['minutes']:.2f}x; FSC=0.5 "
              f"{big['fsc_0.5_a']:.1f} A against {small['fsc_0.5_a']:.1f} A")


if __name__ == "__main__":
    main()
