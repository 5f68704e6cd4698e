"""Downsample a particle stack by Fourier cropping and write a STAR with the new pixel size.

Example: cryoai downsample particles.star --box 64 --out small/particles.star
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError, OutputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="input .star or .cs")
    parser.add_argument("--box", type=int, required=True, help="new box size (even, <= input box)")
    parser.add_argument("--out", required=True,
                        help="output .star (the .mrcs is written beside it)")
    parser.add_argument("--datadir", default=None, help="folder to look for image stacks in")
    parser.add_argument("--chunk-size", type=int, default=1024, help="images processed at once")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from dataclasses import replace

    from ..io import load_particles
    from ..io.images import ImageSource
    from ..io.mrc import StackWriter
    from ..io.star import write_star
    from ..physics.fft import fourier_crop_2d
    from .common import progress_bar

    if args.chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1 (got {args.chunk_size})")
    table = load_particles(args.particles, datadir=args.datadir)
    n_in = table.box_px
    if args.box % 2 or args.box > n_in or args.box < 8:
        raise InputError(f"--box {args.box}: must be even, at least 8 and at most the input box "
                         f"({n_in})")
    out = Path(args.out)
    if out.suffix != ".star":
        raise InputError(f"--out {out}: must end in .star")
    stack_path = out.with_suffix(".mrcs")
    for p in (out, stack_path):
        if p.exists() and not args.force:
            raise OutputError(f"{p}: exists; use --force to overwrite")
    if Path(args.particles).resolve() == out.resolve():
        raise OutputError(f"--out {out}: would overwrite the input")
    inputs = {str(Path(p).resolve()) for p in table.stack_files}
    if str(stack_path.resolve()) in inputs:
        raise OutputError(f"--out {out}: {stack_path} would overwrite an input stack")
    source = ImageSource(table)
    source.validate()
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = n_in / args.box
    new_pixel = table.pixel_size_a * scale
    bar = progress_bar(len(table), "downsample", disable=args.quiet)
    try:
        with StackWriter(stack_path, len(table), args.box, float(new_pixel[0])) as writer:
            for start in range(0, len(table), args.chunk_size):
                idx = np.arange(start, min(start + args.chunk_size, len(table)))
                images = torch.as_tensor(source.read(idx), dtype=torch.float64)
                small = fourier_crop_2d(images, args.box).float().numpy()
                writer.write(start, small)
                bar.update(len(idx))
    except BaseException:
        for d in created:  # leave no empty folders behind (e.g. NaN pixels found while reading)
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        bar.close()
    new_table = replace(
        table,
        stack_files=(str(stack_path.resolve()),),
        stack_ids=np.zeros(len(table), dtype=np.int32),
        stack_indices=np.arange(len(table), dtype=np.int32),
        box_px=args.box,
        pixel_size_a=new_pixel,
    )
    if new_table.optics is not None:
        optics = new_table.optics.copy()
        if "rlnImagePixelSize" in optics:
            old = pd.to_numeric(optics["rlnImagePixelSize"]).to_numpy(dtype=np.float32)
            optics["rlnImagePixelSize"] = (old * np.float32(scale)).astype(str)
        if "rlnImageSize" in optics:
            optics["rlnImageSize"] = str(args.box)
        new_table = replace(new_table, optics=optics)
    write_star(out, new_table)
    print(f"wrote {len(table)} images of {args.box} px ({new_pixel[0]:.4f} A) to {stack_path} "
          f"and {out}")
    return 0
