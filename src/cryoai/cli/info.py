"""Summarise a particle file (.star or .cs): count, box, pixel size, CTF ranges, poses.

Example: cryoai info particles.star
"""

from __future__ import annotations

import argparse

import numpy as np


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="RELION .star or cryoSPARC .cs particle file")
    parser.add_argument("--datadir", default=None,
                        help="folder to look for image stacks in, after the current folder (the project "
                             "folder, to which RELION and cryoSPARC write stack names) and the particle "
                             "file's folder")
    parser.add_argument("--check-images", action="store_true",
                        help="also open every stack and check the references and the box")


def _range(values: np.ndarray, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    lo, hi = float(np.min(values)) * scale, float(np.max(values)) * scale
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} .. {fmt.format(hi)}"


def describe(table) -> list[str]:
    """Lines of a human-readable summary of a ParticleTable."""
    n_stacks = len(table.stack_files)
    lines = [
        f"file:               {table.source_path}",
        f"particles:          {len(table)} in {n_stacks} stack(s)",
        f"box:                {table.box_px} px",
        f"pixel size:         {_range(table.pixel_size_a, fmt='{:.4f}')} A",
        f"defocus U:          {_range(table.defocus_u_a)} A",
        f"defocus V:          {_range(table.defocus_v_a)} A",
        f"astigmatism angle:  {_range(table.defocus_angle_rad, 180 / np.pi)} deg",
        f"voltage:            {_range(table.voltage_kv)} kV",
        f"Cs:                 {_range(table.cs_mm, fmt='{:.3f}')} mm",
        f"amplitude contrast: {_range(table.amplitude_contrast, fmt='{:.3f}')}",
        f"phase shift:        {_range(table.phase_shift_rad, 180 / np.pi)} deg",
        f"poses:              {'yes' if table.has_poses else 'no'}",
        f"shifts:             {'yes' if table.has_shifts else 'no'}",
    ]
    if table.has_shifts:
        lines.append(f"shift magnitude:    {_range(np.linalg.norm(table.shifts_a, axis=1))} A")
    return lines


def main(args) -> int:
    from ..io import load_particles
    from ..io.images import ImageSource

    table = load_particles(args.particles, datadir=args.datadir)
    for line in describe(table):
        print(line)
    if args.check_images:
        ImageSource(table).validate()
        print("images:             all references resolve, boxes agree")
    return 0
