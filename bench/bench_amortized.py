"""Cost against the number of particles, and poses of new particles (issue: amortization).

Simulates one particle set (the embedded 70S map, L=64, 5 A/px, SNR -10 dB by default, 10 A
shifts), then runs the default ``cryoai train`` on its first n particles for each n of
``--sizes``, one after the other, and prints per run: wall time, the time of each stage, how
the particles outside the search's subset were posed (encoder or global search, and how fast,
end to end from disk), and the median rotation error against the truth (after global
alignment). With ``--compare-global`` it also runs the largest size with the global search
and the previous, longer refinement for every particle outside the subset (the default before
the encoder stage), for the same particles. With ``--new N`` it simulates N particles the runs
never saw (noise-free and at the SNR) and poses them with ``cryoai predict-poses`` against the
largest run's map: speed and median error.

Example (the issue's figures; about 40 minutes on 2 cores):
  python bench/bench_amortized.py --outdir /tmp/bench-amortized --sizes 5000 20000 50000 \\
      --compare-global --new 10000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cryoai.cli.main import main as cli
from cryoai.io import load_particles, write_star

OLD_DEFAULT = ["--pose-encoder", "off", "--assign-refine-method", "random", "--assign-refine-rounds", "8",
               "--assign-refine-candidates", "48", "--assign-refine-radius-frac", "0.7",
               "--decoder-max-images", "0"]


def simulate(out: Path, n: int, snr_db: float | None, seed: int) -> Path:
    if not (out / "particles.star").exists():
        noise = ["--no-noise"] if snr_db is None else ["--snr-db", str(snr_db)]
        assert cli(["simulate", "--n", str(n), *noise, "--shift-sigma-a", "10", "--seed", str(seed),
                    "--outdir", str(out), "--quiet", "--force"]) == 0
    return out / "particles.star"


def evaluate(star: Path, gt_star: Path, volume: Path, gt_map: Path, out: Path) -> dict:
    assert cli(["evaluate", "--map", str(volume), "--poses", str(star), "--gt-map", str(gt_map),
                "--gt-poses", str(gt_star), "--outdir", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def train(star: Path, run: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    assert cli(["train", str(star), "--outdir", str(run), "--force", "--quiet", "--no-tensorboard",
                "--volume-every-minutes", "1000", *extra]) == 0
    minutes = (time.perf_counter() - t0) / 60
    stages = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "stage" in record:
            stages[record["stage"]] = record
    return {"minutes": minutes, "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", type=Path, default=Path("bench-amortized"))
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    p.add_argument("--snr-db", type=float, default=-10.0)
    p.add_argument("--compare-global", action="store_true")
    p.add_argument("--new", type=int, default=0, help="new particles posed by predict-poses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--extra", default="", help="extra train flags")
    args = p.parse_args()
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    star = simulate(out / "sim", max(args.sizes), args.snr_db, seed=1)
    table = load_particles(star)
    gt_map = out / "sim" / "ground_truth.mrc"
    extra = ["--device", args.device, *args.extra.split()]
    runs = [(n, f"default, {n} particles", []) for n in args.sizes]
    if args.compare_global:
        n = max(args.sizes)
        runs.append((n, f"global search + previous refinement, {n} particles", OLD_DEFAULT))
    rows = []
    for n, label, flags in runs:
        sub = out / f"particles_{n}.star"
        if not sub.exists():
            write_star(sub, table.subset(list(range(n))))
        run = out / f"run_{n}{'_global' if flags else ''}"
        result = train(sub, run, extra + flags)
        metrics = evaluate(run / "poses.star", sub, run / "volume.mrc", gt_map, run / "eval")
        st = result["stages"]
        row = {"run": label, "minutes": round(result["minutes"], 2),
               "stage_seconds": {k: round(v.get("seconds", v.get("search_seconds", 0.0)), 1)
                                 for k, v in st.items()},
               "assignment": {k: st.get("assignment", {}).get(k) for k in
                              ("mode", "particles", "amortized", "global", "images_per_s")},
               "encoder_check": {k[6:]: v for k, v in st.get("encoder", {}).items()
                                 if k.startswith("check_")},
               "rotation_error_deg_median": metrics.get("rotation_error_deg_median"),
               "fsc05_px": metrics.get("resolution_px_0.5")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.new:
        ckpt = out / f"run_{max(args.sizes)}" / "checkpoint.pt"
        for label, snr, seed in (("noise-free", None, 2), (f"{args.snr_db:g} dB", args.snr_db, 3)):
            new = simulate(out / f"new_{label.replace(' ', '')}", args.new, snr, seed)
            predicted = out / f"predicted_{label.replace(' ', '')}.star"
            t0 = time.perf_counter()
            assert cli(["predict-poses", str(ckpt), str(new), "--out", str(predicted), "--force", "--quiet",
                        "--device", args.device]) == 0
            seconds = time.perf_counter() - t0
            metrics = evaluate(predicted, new, ckpt.parent / "volume.mrc", gt_map, out / f"eval_new_{seed}")
            row = {"run": f"predict-poses, {args.new} new particles, {label}",
                   "images_per_s": round(args.new / seconds, 1),
                   "rotation_error_deg_median": metrics.get("rotation_error_deg_median")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
