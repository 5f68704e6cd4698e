"""Demo: simulate a data set from the embedded 70S ribosome map as a user's would look (noisy
images at -10 dB, in micrographs with their own noise, a tenth of the picks junk), reconstruct
it ab initio, evaluate against the truth, and print where the map, the report and the plots are.

Example: cryoai demo --outdir demo/      (cryoai demo --snr-db none: noise-free images)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outdir", default="cryoai-demo", help="output folder (default cryoai-demo)")
    parser.add_argument("--n", type=int, default=1000, help="particles to simulate (default 1000)")
    parser.add_argument("--box", type=int, default=64, help="box in px (the map is Fourier-cropped)")
    parser.add_argument("--snr-db", type=_snr, default=-10.0,
                        help="the images' SNR in dB (default -10, as real particles; 'none': noise-free)")
    parser.add_argument("--junk-fraction", type=float, default=0.1,
                        help="share of the picks that are junk (default 0.1)")
    parser.add_argument("--no-micrographs", dest="micrographs", action="store_false",
                        help="no micrograph groups (default: about 120 picks per micrograph, each with "
                             "its own noise level)")
    parser.add_argument("--shift-sigma-a", type=float, default=10.0, help="shift sigma, A (default 10)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--encoder-minutes", type=float, default=0.5,
                        help="training budget of the pose encoder, where it runs (default 0.5; train: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true", help="reuse a non-empty --outdir")
    parser.add_argument("--quiet", action="store_true")


def _snr(text: str) -> float | None:
    """``--snr-db``: a number of dB, or ``none`` (noise-free)."""
    return None if text.strip().lower() == "none" else float(text)


def main(args) -> int:
    from . import main as cli  # the in-process command line

    out = Path(args.outdir)
    sim, run, ev = out / "simulated", out / "run", out / "evaluation"
    common = ["--force"] if args.force else []
    quiet = ["--quiet"] if args.quiet else []
    device = ["--device", args.device] if args.device else []
    noise = ["--no-noise"] if args.snr_db is None else ["--snr-db", str(args.snr_db)]
    realism = [*(["--micrographs"] if args.micrographs else []), "--junk-fraction", str(args.junk_fraction)]
    said = "noise-free" if args.snr_db is None else f"at {args.snr_db:g} dB"
    said += (", in micrographs" if args.micrographs else "") + \
        (f", {args.junk_fraction:.0%} of them junk" if args.junk_fraction > 0 else "")
    print(f"[1/4] simulating {args.n} particles from the embedded 70S ribosome map ({said}) -> {sim}")
    rc = cli.main(["simulate", "--n", str(args.n), "--box", str(args.box), *noise, *realism,
                   "--shift-sigma-a", str(args.shift_sigma_a), "--seed", str(args.seed),
                   "--outdir", str(sim), *common, *quiet, *device])
    if rc:
        return rc
    print(f"[2/4] ab initio reconstruction for up to {args.minutes:g} min -> {run}")
    rc = cli.main(["train", str(sim / "particles.star"), "--outdir", str(run),
                   "--max-minutes", str(args.minutes), "--seed", str(args.seed),
                   "--encoder-minutes", str(args.encoder_minutes),
                   "--ground-truth", str(sim / "ground_truth.mrc"), *common, *quiet, *device])
    if rc:
        return rc
    print(f"[3/4] evaluating against the ground truth -> {ev}")
    rc = cli.main(["evaluate", "--map", str(run / "volume.mrc"), "--poses", str(run / "poses.star"),
                   "--gt-map", str(sim / "ground_truth.mrc"), "--gt-poses", str(sim / "particles.star"),
                   "--outdir", str(ev)])
    if rc:
        return rc
    print(f"[4/4] writing the run report -> {run / 'report'}")
    rc = cli.main(["report", str(run), "--gt-map", str(sim / "ground_truth.mrc"),
                   "--gt-poses", str(sim / "particles.star")])
    if rc:
        return rc
    metrics = json.loads((ev / "metrics.json").read_text())
    print("\nresult:")
    print(f"  map:            {run / 'volume.mrc'}  (aligned: {ev / 'aligned_volume.mrc'})")
    print(f"  poses:          {run / 'poses.star'}")
    print(f"  report:         {run / 'report' / 'report.html'} (open it in a browser)")
    print(f"  FSC plot:       {ev / 'fsc.png'}")
    print(f"  map slices:     {ev / 'map_slices.png'}")
    print(f"  rotation error: {ev / 'rotation_errors.png'} "
          f"(median {metrics.get('rotation_error_deg_median', float('nan')):.1f} deg)")
    print(f"  resolution:     FSC=0.5 at {metrics['resolution_px_0.5']:.2f} px "
          f"({metrics['resolution_a_0.5']:.1f} A)")
    return 0
