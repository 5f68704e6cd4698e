"""Peak memory and time per step of `cryoai train` as the data set grows (10k -> 1M particles).

Takes a large simulated set on disk (e.g. the output of
`python bench/bench_simulate_memory.py --n 1000000 --box 64 --outdir DIR --keep`), writes STAR
files that reference its first N particles, and runs `cryoai train` on each for a fixed number
of steps in a child process, reporting that child's peak resident memory (wait4 ru_maxrss),
the wall time outside training (start-up: reading the table, checks, scale estimate; and the
end: predicting and writing the poses of every particle) and the time per training step (from
train_log.jsonl, after the first logged step).

Example:
  python bench/bench_train_scaling.py /work/data/sim1m/particles.star --sizes 10000 1000000 \\
      --steps 200 --threads 2
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


def subset_star(src: Path, n: int, dst: Path) -> None:
    """A copy of the STAR file ``src`` with only its first ``n`` particle rows (text level:
    the other blocks and the loop header are kept as they are). Relative stack names are made
    absolute so that the copy can live elsewhere."""
    out, state, count = [], "other", 0
    for line in src.read_text().splitlines(keepends=True):
        s = line.strip()
        if s.startswith("data_"):
            state = "header" if s.startswith("data_particles") else "other"
        elif state == "header" and s and not s.startswith(("_", "loop_", "#")):
            state = "rows"
        if state != "rows":
            out.append(line)
            continue
        if not s or count >= n:
            continue
        ref, rest = line.split(None, 1)
        idx, _, stack = ref.partition("@")
        if not os.path.isabs(stack):
            stack = str(src.parent / stack)
        out.append(f"{idx}@{stack}\t{rest}")
        count += 1
    if count < n:
        raise SystemExit(f"{src}: only {count} particles, fewer than {n}")
    dst.write_text("".join(out))


def run_one(star: Path, outdir: Path, steps: int, batch_size: int, threads: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # max-epochs as a fraction of an epoch so that exactly `steps` steps run.
    with open(star) as f:
        n_particles = sum(1 for line in f if "@" in line)
    epochs = steps * batch_size / n_particles
    cmd = [sys.executable, "-m", "cryoai.cli.main", "train", str(star), "--outdir", str(outdir),
           "--ab-initio", "encoder", "--max-epochs", f"{epochs:.9f}", "--batch-size", str(batch_size),
           "--log-every", "10", "--volume-every-minutes", "1000", "--checkpoint-every-minutes", "1000",
           "--no-tensorboard", "--quiet", "--force", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"train failed on {star}: {err[-2000:]}")
    log = [json.loads(line) for line in (outdir / "train_log.jsonl").read_text().splitlines()
           if '"step"' in line]
    first, last = log[0], log[-1]
    step_s = (last["minutes"] - first["minutes"]) * 60 / max(1, last["step"] - first["step"])
    outside_s = wall - last["minutes"] * 60
    return {"n": n_particles, "peak_rss_gib": usage.ru_maxrss / 1024**2, "wall_s": wall,
            "outside_s": outside_s, "step_ms": step_s * 1e3, "images_per_s": batch_size / step_s,
            "steps": last["step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("star", type=Path, help="particles.star of a large simulated set")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--extra", default="", help="more `cryoai train` options, quoted")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryoai-scaling-") as tmp:
        for n in args.sizes:
            star = Path(tmp) / f"first_{n}.star"
            subset_star(args.star, n, star)
            rows.append(run_one(star, Path(tmp) / f"run_{n}", args.steps, args.batch_size, args.threads,
                                args.extra.split()))
            print(f"  done n={n}", flush=True)
    print(f"\n{'particles':>10} {'peak RSS GiB':>13} {'outside training s':>19} {'ms/step':>9} "
          f"{'images/s':>9}")
    for r in rows:
        print(f"{r['n']:>10,} {r['peak_rss_gib']:>13.3f} {r['outside_s']:>19.1f} {r['step_ms']:>9.1f} "
              f"{r['images_per_s']:>9.1f}")
    if len(rows) > 1:
        print(f"\npeak RSS ratio {rows[-1]['n']:,} / {rows[0]['n']:,}: "
              f"{rows[-1]['peak_rss_gib'] / rows[0]['peak_rss_gib']:.3f}; time per step ratio: "
              f"{rows[-1]['step_ms'] / rows[0]['step_ms']:.3f}")


if __name__ == "__main__":
    main()
