"""Symmetry expansion: every particle once per operator of its map's point group, at each of its
equivalent poses (as RELION's relion_particle_symmetry_expand), for local work on one subunit.

A map with symmetry S projects the same image at the poses R and S R, so each particle is
written G times, at S_k R for every operator S_k of the group (RELION's names and axes, the
frame a --sym run writes its poses in), with the same image, CTF and shift; the copy's operator
is in rlnCryoaiSymmetryOperator (1 = the identity, the particle's own pose). The copies are not
independent data: use them for local refinement or classification of a subunit with its mask,
never for a global search or a gold-standard FSC (the halves would share images; every copy
keeps its particle's rlnRandomSubset, so RELION's halves stay apart).

Example: cryoai symmetry-expand run/poses.star --sym C4 --out expanded/particles.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particles with poses (.star or .cs), in the group's standard "
                                          "frame (as cryoai train --sym and RELION write them)")
    parser.add_argument("--sym", required=True,
                        help="the point group, RELION's names: Cn, Dn, T, O, I1-I4")
    parser.add_argument("--out", required=True,
                        help="output .star (or .cs): every particle once per operator")
    parser.add_argument("--datadir", default=None, help="folder to look for image stacks in")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def expanded(rotations: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(N * G, 3, 3): every rotation ``R_i`` at ``S_k R_i``, particle by particle (row
    ``i * G + k``), the identity first when the group's is.
    """
    return np.einsum("kab,nbc->nkac", group, rotations).reshape(-1, 3, 3)


def main(args) -> int:
    from ..io import load_particles, write_cs, write_star
    from ..physics.poses import Poses
    from ..physics.symmetry import point_group

    try:
        group = point_group(args.sym).numpy()
    except InputError as error:
        raise InputError(f"--sym: {error}") from None
    out = Path(args.out)
    if out.suffix.lower() not in (".star", ".cs"):
        raise InputError(f"--out {out}: must end in .star or .cs")
    if out.exists() and not args.force:
        raise OutputError(f"{out}: exists; use --force to overwrite")
    if Path(args.particles).resolve() == out.resolve():
        raise OutputError(f"--out {out}: would overwrite the input")
    table = load_particles(args.particles, datadir=args.datadir)
    if not table.has_poses:
        raise InputError(f"{args.particles}: no poses to expand (rlnAngleRot/Tilt/Psi)")
    g = len(group)
    rows = np.repeat(np.arange(len(table)), g)
    copies = table.subset(rows)
    rotations = expanded(np.asarray(table.rotations, dtype=np.float64), group.astype(np.float64))
    shifts = np.asarray(table.shifts_a, dtype=np.float64)[rows] if table.has_shifts else None
    poses = Poses.from_arrays(rotations.astype(np.float32),
                              None if shifts is None else shifts.astype(np.float32))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".cs":
        write_cs(out, copies, poses=poses)
    else:
        operator = np.tile(np.arange(1, g + 1), len(table))
        write_star(out, copies, poses=poses, extra_columns={"rlnCryoaiSymmetryOperator": operator})
    print(f"wrote {len(copies)} particles ({len(table)} x {g} operators of {args.sym.upper()}) to {out}")
    return 0
