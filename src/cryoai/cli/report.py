"""Write a self-contained HTML report of a training run, with its plots as PNG files.

The page shows the loss and resolution curves, the FSC curves (half maps; and the ground
truth when given), central slices and projections of the map, the sky map of the predicted
viewing directions, the rotation and shift error histograms when the true poses are given,
and the run's configuration. The PNGs are written beside the page. A run with a latent model
(--latent-dim) gets its latent space and the maps along its first directions (cryoai analyze,
run first where RUN_DIR/analyze does not hold it yet).

Example: cryoai report run/ --gt-map sim/ground_truth.mrc --gt-poses sim/particles.star
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a cryoai train output directory")
    parser.add_argument("--outdir", default=None,
                        help="where report.html and the PNGs go (default RUN_DIR/report)")
    parser.add_argument("--gt-map", default=None, help="ground-truth map (.mrc), to compare with")
    parser.add_argument("--gt-poses", default=None, help="ground-truth poses (.star/.cs), to compare with")
    parser.add_argument("--datadir", default=None, help="folder to look for image stacks in")


def main(args) -> int:
    from pathlib import Path

    from ..evaluation.report import build_report
    from ..pipeline import Policy
    from .analyze import analyze

    run = Path(args.run_dir)
    if (run / "latent.npz").exists() and not (run / "analyze" / "analyze.json").exists():
        analyze(run)

    path = build_report(args.run_dir, args.outdir, gt_map=args.gt_map, gt_poses=args.gt_poses,
                        datadir=args.datadir, preferred_views_scf=Policy().preferred_views_scf)
    print(f"report: {path}")
    return 0
