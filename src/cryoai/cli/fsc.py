"""Fourier shell correlation between two maps, with resolutions at 0.5 and 0.143.

Example: cryoai fsc map.mrc ground_truth.mrc --plot fsc.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..errors import InputError, OutputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map_a", help="first map (.mrc)")
    parser.add_argument("map_b", help="second map (.mrc), same box")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="pixel size in A (default: from the first map's header)")
    parser.add_argument("--mask-radius", type=float, default=None,
                        help="apply a soft spherical mask of this radius (px) to both maps")
    parser.add_argument("--plot", default=None, help="write the curve as a PNG here")
    parser.add_argument("--json", default=None, help="write the curve and resolutions as JSON here")


def main(args) -> int:
    from pathlib import Path

    from ..evaluation.plots import plot_fsc
    from ..io import write_json_atomic
    from ..io.mrc import read_volume
    from ..physics.fsc import fsc, resolution_px
    from ..physics.masks import spherical_mask

    for option, out in (("--plot", args.plot), ("--json", args.json)):
        if out and not Path(out).resolve().parent.is_dir():
            raise OutputError(f"{option} {out}: the folder {Path(out).parent} does not exist")
    a, pix_a = read_volume(args.map_a)
    b, _ = read_volume(args.map_b)
    if a.shape != b.shape:
        raise InputError(f"{args.map_b}: box {b.shape} differs from {args.map_a} {a.shape}")
    if a.shape[-1] % 2:
        raise InputError(f"{args.map_a}: box size {a.shape[-1]} is odd; cryoai needs even boxes")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise InputError(f"--pixel-size must be positive (got {args.pixel_size})")
    pixel_size_a = args.pixel_size or pix_a or 1.0
    va, vb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if args.mask_radius:
        m = spherical_mask(a.shape[-1], args.mask_radius, soft_edge_px=4, dtype=torch.float64)
        va, vb = va * m, vb * m
    curve = fsc(va, vb)
    n = a.shape[-1]
    res = {t: resolution_px(curve, t) for t in (0.5, 0.143)}
    print(f"{'shell':>5} {'1/A':>8} {'FSC':>7}")
    for s, value in enumerate(curve.tolist()):
        print(f"{s:5d} {s / (n * pixel_size_a):8.4f} {value:7.4f}")
    for t, r in res.items():
        print(f"FSC={t}: {r:.2f} px = {r * pixel_size_a:.2f} A")
    if args.plot:
        plot_fsc(curve.numpy(), n, pixel_size_a, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        freq = (np.arange(len(curve)) / (n * pixel_size_a)).tolist()
        write_json_atomic(args.json, {"fsc": curve.tolist(), "pixel_size_a": pixel_size_a,
                                      "resolution_px": {str(k): v for k, v in res.items()},
                                      "resolution_a": {str(k): v * pixel_size_a for k, v in res.items()},
                                      "frequency_per_a": freq}, indent=1)
    return 0
