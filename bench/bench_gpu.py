"""The default run per stage on a device, at the box sizes users extract: seconds and images/s
of each stage, at 128 and 256 px (the run's search works at 64 px: docs/pipeline.md#working-box).

It simulates each set as ``bench/bench_box.py`` does (the embedded 70S map Fourier-padded to the
box, micrographs, 10% junk, -10 dB once cropped to 64 px), runs ``cryoai train --device DEVICE``
on it and reads the stages' times from ``train_log.jsonl``. The same code runs on the CPU
(``--device cpu``) and on a GPU (``--device cuda``); nothing in it is device-specific.

Example (docs/results.md#box-sizes):
  python bench/bench_gpu.py --outdir /tmp/bench-gpu --device cuda --boxes 128 256 --n 20000
  python bench/bench_gpu.py --outdir /tmp/bench-gpu --device cpu --boxes 128 --n 5000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

from bench_box import padded_map  # bench/, beside this script
from cryoai.cli.main import main as cli

#: train_log.jsonl's stages and the key of their seconds.
STAGES = (("working_box", "seconds"), ("search", "search_seconds"), ("encoder", "seconds"),
          ("assignment", "seconds"), ("junk", "seconds"), ("reconstruction", "seconds"), ("fit", "seconds"))


def stage_table(run: Path, n: int) -> pd.DataFrame:
    """Seconds and images/s of each stage of a run (the search's attempts added)."""
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    plan = next((r for r in log if r.get("stage") == "search_plan"), {})
    outputs = json.loads((run / "outputs.json").read_text())
    rows = {}
    for stage, key in STAGES:
        recs = [r for r in log if r.get("stage") == stage and isinstance(r.get(key), (int, float))]
        if not recs:
            continue
        seconds = sum(r[key] for r in recs) if stage == "search" else recs[-1][key]
        images = {"search": plan.get("subset", n), "assignment": recs[-1].get("particles") or 0,
                  "fit": outputs.get("images_seen", 0)}.get(stage, n)
        rate = images / seconds if seconds else None
        rows[stage] = {"seconds": seconds, "images": images, "images_per_s": rate}
    return pd.DataFrame(rows).T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    for box in args.boxes:
        out = args.outdir / f"box{box}"
        out.mkdir(parents=True, exist_ok=True)
        sim = out / "sim"
        if not (sim / "particles.star").exists():
            snr_db = -10.0 - 20 * math.log10(box / 64)
            assert cli(["simulate", "--map", str(padded_map(box, out / "map.mrc")), "--n", str(args.n),
                        "--snr-db", f"{snr_db:.3f}", "--shift-sigma-a", "10", "--micrographs",
                        "--junk-fraction", "0.1", "--seed", str(args.seed), "--quiet",
                        "--outdir", str(sim)]) == 0
        t0 = time.perf_counter()
        assert cli(["train", str(sim / "particles.star"), "--outdir", str(out / "run"),
                    "--device", args.device, "--quiet", "--no-tensorboard", "--force"]) == 0
        wall = time.perf_counter() - t0
        on = "CPU"
        if args.device.startswith("cuda"):
            on = (f"{torch.cuda.get_device_name()}, peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"\n{box} px, {args.n} particles, --device {args.device} ({on}): {wall:.0f} s")
        print(stage_table(out / "run", args.n).to_string(float_format=lambda v: f"{v:,.1f}"))


if __name__ == "__main__":
    main()
