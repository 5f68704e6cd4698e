"""The default run in one process against two under torchrun (gloo, CPU): the time of the stages
whose cost grows with the number of particles, and whether the two give the same poses and map.

Both runs use one thread per process (``OMP_NUM_THREADS=1``), so that two processes use two
cores where one process uses one: the N-proportional stages (the assignment of the particles
beyond the search's subset, the junk stage's scores and second look, the reconstruction's sums)
are split between the ranks and should take half the time; the search runs on every rank (its
subset is small and its cost does not grow with N). Stage times are read from each run's
``train_log.jsonl``.

Example (the first 20,000 particles of a simulated set, a search subset of 1,000):
  python bench/bench_distributed.py /work/data/sim100k/particles.star --n 20000 --subset 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_scaling import subset_star  # noqa: E402

STAGES = ("search_done", "assignment", "junk", "reconstruction")


def stage_seconds(run: Path) -> dict[str, float]:
    out = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") in STAGES and "seconds" in rec:
            out[rec["stage"]] = float(rec["seconds"])
    return out


def rotations(star: Path) -> np.ndarray:
    df = starfile.read(star)
    df = df["particles"] if isinstance(df, dict) else df
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    return Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("star", type=Path, help="particles.star of a simulated set")
    p.add_argument("--n", type=int, default=20000, help="its first N particles")
    p.add_argument("--subset", type=int, default=1000, help="the search's subset (--search-subset)")
    p.add_argument("--extra", default="", help="more `cryoai train` options, quoted")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory() as tmp:
        star = Path(tmp) / "particles.star"
        subset_star(args.star, args.n, star)
        train = ["-m", "cryoai.cli.main", "train", str(star), "--search-subset", str(args.subset), "--quiet",
                 "--no-tensorboard", *args.extra.split()]
        runs = {"1 process": [sys.executable, *train, "--outdir", f"{tmp}/one"],
                "2 processes (torchrun)": [torchrun, "--standalone", "--nproc_per_node", "2", *train,
                                           "--outdir", f"{tmp}/two"]}
        walls, seconds = {}, {}
        for label, cmd in runs.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            walls[label] = time.perf_counter() - t0
            seconds[label] = stage_seconds(Path(tmp) / ("one" if label == "1 process" else "two"))
        r1, r2 = rotations(Path(tmp) / "one" / "poses.star"), rotations(Path(tmp) / "two" / "poses.star")
        diff = np.degrees(Rotation.from_matrix(np.einsum("nji,njk->nik", r1, r2)).magnitude())
        from cryoai.io import read_volume

        v1, _ = read_volume(f"{tmp}/one/volume.mrc")
        v2, _ = read_volume(f"{tmp}/two/volume.mrc")
        corr = float(np.corrcoef(v1.ravel(), v2.ravel())[0, 1])
    labels = list(runs)
    print(f"{args.n:,} particles, search subset {args.subset:,}, one thread per process")
    print("| stage | " + " | ".join(labels) + " | ratio |")
    print("|---|---|---|---|")
    for stage in (*STAGES, "wall"):
        a = walls[labels[0]] if stage == "wall" else seconds[labels[0]].get(stage, float("nan"))
        b = walls[labels[1]] if stage == "wall" else seconds[labels[1]].get(stage, float("nan"))
        print(f"| {stage} | {a:.1f} s | {b:.1f} s | {b / a:.2f} |")
    print(f"poses: median {np.median(diff):.4f} deg apart, largest {diff.max():.4f} deg; "
          f"maps correlate at {corr:.6f}")


if __name__ == "__main__":
    main()
