"""Peak memory of the default run, per stage, as the number of particles grows.

For each size N, the first N particles of a large set (``bench_train_scaling.subset_star``) go
through ``cryoai train --max-minutes M`` in a child process that samples its own resident memory
every 20 ms (``/proc/self/statm``) and records, for each stage function of
``cryoai.pipeline.run`` (and the trainer's fit), the memory when it starts and its peak. The
table then says which stage holds the peak and what grows with N.

Example (a 100,000-particle set from ``cryoai simulate --n 100000 --box 64 --snr-db -10
--shift-sigma-a 10 --outdir /work/data/sim100k``):
  python bench/bench_memory_stages.py /work/data/sim100k/particles.star --sizes 5000 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_scaling import subset_star  # noqa: E402

STAGES = ("noise_stage", "working_box_stage", "first_guess_stage", "search_stage", "balance_views_stage",
          "symmetry_stage", "encoder_stage", "assignment_stage", "junk_stage", "start_decoder",
          "classes_stage", "views_stage")

CHILD = r'''
import json, os, sys, threading, time
import cryoai.pipeline.run as run
import cryoai.training.trainer as trainer
page = os.sysconf("SC_PAGE_SIZE")
now = {"stage": "reading and checks"}
peaks = {"reading and checks": [0, 0]}
order = ["reading and checks"]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def enter(name):
    now["stage"] = name
    if name not in peaks:
        order.append(name)
        peaks[name] = [rss(), rss()]

def sample():
    while True:
        value, stage = rss(), now["stage"]
        peaks[stage][1] = max(peaks[stage][1], value)
        time.sleep(0.02)

def wrapped(owner, name, label):
    fn = getattr(owner, name)
    def call(*args, **kwargs):
        enter(label)
        try:
            return fn(*args, **kwargs)
        finally:
            enter("between stages")
    setattr(owner, name, call)

for name in json.loads(sys.argv[1]):
    if hasattr(run, name):
        wrapped(run, name, name)
wrapped(trainer.Trainer, "fit", "polish (Trainer.fit)")
threading.Thread(target=sample, daemon=True).start()
from cryoai.cli.main import main
code = main(sys.argv[3:])
json.dump({"order": order, "peaks": peaks}, open(sys.argv[2], "w"))
sys.exit(code)
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("star", type=Path, help="particles.star of a large set")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 100000])
    p.add_argument("--max-minutes", type=float, default=1.0, help="the runs' --max-minutes")
    p.add_argument("--extra", default="", help="more `cryoai train` options, quoted")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            star = Path(tmp) / f"first_{n}.star"
            subset_star(args.star, n, star)
            out = Path(tmp) / f"stages_{n}.json"
            cmd = [sys.executable, "-c", CHILD, json.dumps(STAGES), str(out), "train", str(star), "--outdir",
                   str(Path(tmp) / f"run_{n}"), "--max-minutes", str(args.max_minutes), "--quiet",
                   *args.extra.split()]
            subprocess.run(cmd, check=True)
            results[n] = json.loads(out.read_text())
    sizes = args.sizes
    stages = [s for s in results[sizes[-1]]["order"]]
    head = "".join(f" | N={n:,}: start / peak MiB" for n in sizes)
    print(f"| stage{head} |")
    print("|---" * (len(sizes) + 1) + "|")
    for stage in stages:
        cells = []
        for n in sizes:
            start, peak = results[n]["peaks"].get(stage, [0, 0])
            cells.append(f"{start / 2**20:.0f} / {peak / 2**20:.0f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    whole = {n: max(v[1] for v in results[n]["peaks"].values()) for n in sizes}
    first = whole[sizes[0]]
    print("\npeak RSS over the run: " + ", ".join(
        f"N={n:,}: {whole[n] / 2**30:.3f} GiB ({whole[n] / first:.3f}x)" for n in sizes))


if __name__ == "__main__":
    main()
