"""Ab initio convergence benchmark: `cryoai train` from unknown poses, per seed.

For each seed, runs the training command in-process on a particle set with ground truth, then
`cryoai evaluate`, and prints wall time, median rotation error and FSC resolutions. Optionally
also runs the known-pose reference (`--poses` = the truth) to give the best resolution any
pose estimate can reach with these images.

Example (the issue's bars):
  python bench/bench_abinitio.py ../shared/data/aspire-70s/noise-free --seeds 0 1 2 3 4
  python bench/bench_abinitio.py ../shared/data/aspire-70s/snr0.1 --seeds 0 1 2 3 4 --reference
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cryoai.cli.main import main as cli


def run(dataset: Path, outdir: Path, seed: int, extra: list[str], poses: str | None = None) -> dict:
    run_dir = outdir / (f"seed{seed}" if poses is None else "reference")
    args = ["train", str(dataset / "particles.star"), "--outdir", str(run_dir), "--force", "--quiet",
            "--seed", str(seed), "--volume-every-minutes", "1000", *extra]
    if poses:
        args += ["--poses", poses]
    t0 = time.perf_counter()
    rc = cli(args)
    minutes = (time.perf_counter() - t0) / 60
    if rc:
        return {"seed": seed, "error": f"train exited {rc}"}
    ev = ["evaluate", "--map", str(run_dir / "volume.mrc"), "--gt-map", str(dataset / "ground_truth.mrc"),
          "--outdir", str(run_dir / "eval")]
    pose_file = run_dir / "poses.star" if poses is None else Path(poses)
    ev += ["--poses", str(pose_file), "--gt-poses", str(dataset / "particles.star")]
    cli(ev)
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"seed": seed, "minutes": minutes, "rot_err_deg": m.get("rotation_error_deg_median"),
            "fsc05_px": m["resolution_px_0.5"], "fsc05_a": m["resolution_a_0.5"],
            "fsc0143_px": m["resolution_px_0.143"], "mirror": m.get("alignment_mirror")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="folder with particles.star and ground_truth.mrc")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--outdir", type=Path, default=Path("bench-abinitio"))
    p.add_argument("--reference", action="store_true", help="also train with the true poses")
    p.add_argument("--extra", default="", help="extra train flags, e.g. '--preset paper --max-minutes 20'")
    args = p.parse_args()
    extra = args.extra.split()
    rows = []
    if args.reference:
        rows.append(("reference (true poses)",
                     run(args.dataset, args.outdir, 0, extra, poses=str(args.dataset / "particles.star"))))
    for seed in args.seeds:
        rows.append((f"seed {seed}", run(args.dataset, args.outdir, seed, extra)))
        print(json.dumps(rows[-1][1]), flush=True)
    print(f"\n{'run':24} {'minutes':>8} {'rot err':>8} {'FSC0.5 px':>10} {'FSC0.5 A':>9} {'FSC.143 px':>10}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:24} {r['error']}")
            continue
        rot = "-" if r["rot_err_deg"] is None else f"{r['rot_err_deg']:.2f}"
        print(f"{name:24} {r['minutes']:8.1f} {rot:>8} {r['fsc05_px']:10.2f} {r['fsc05_a']:9.1f} "
              f"{r['fsc0143_px']:10.2f}")


if __name__ == "__main__":
    main()
