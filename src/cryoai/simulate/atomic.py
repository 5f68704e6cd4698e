"""Atomic models (PDB/mmCIF) to electron-scattering potential maps with gemmi."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def read_model(path: str | Path):
    """An atomic model (gemmi Structure) with its ligands and waters removed.

    Raises
    ------
    InputError
        A missing or unreadable file, or one without a model.
    """
    import gemmi

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such atomic model file")
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise InputError(f"{path}: not a readable PDB/mmCIF file ({first})") from None
    if len(structure) == 0:
        raise InputError(f"{path}: the file holds no model")
    try:
        # Files without chain IDs or SEQRES (e.g. MDAnalysis' adk) need entities assigned
        # before ligands and waters can be told apart.
        structure.setup_entities()
        structure.remove_ligands_and_waters()
    except RuntimeError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise InputError(f"{path}: cannot sort polymer from ligands and waters ({first})") from None
    return structure


def model_potential(structure, keys: list | None, positions: np.ndarray | None, centre: np.ndarray, *,
                    pixel_size_a: float, box_px: int, resolution_a: float | None = None,
                    source: str = "the model") -> np.ndarray:
    """The potential of ``structure``'s first model with the atoms ``keys`` ((chain, residue
    number, residue name, atom name), in order) at ``positions`` (None: where they are), the
    point ``centre`` (A) at the box centre (voxel ``box_px // 2``); (box_px,)*3 float32 [z, y, x].
    """
    import gemmi

    if box_px % 2:
        raise InputError(f"--box {box_px} is odd; cryoai needs even boxes")
    if pixel_size_a <= 0:
        raise InputError(f"--pixel-size must be positive (got {pixel_size_a})")
    model = structure[0].clone()
    if keys is not None:
        where = {k: i for i, k in enumerate(keys)}
        for chain in model:
            for res in chain:
                for atom in res:
                    i = where.get((chain.name, res.seqid.num, res.name, atom.name))
                    if i is not None:
                        atom.pos = gemmi.Position(*positions[i])
    all_positions = np.array([a.pos.tolist() for chain in model for res in chain for a in res])
    if len(all_positions) == 0:
        raise InputError(f"{source}: the model holds no atoms")
    extent_a = float(np.linalg.norm(all_positions - centre, axis=1).max())
    if 2 * extent_a > box_px * pixel_size_a:
        raise InputError(
            f"{source}: the molecule spans {2 * extent_a:.0f} A, more than the box "
            f"({box_px} px x {pixel_size_a} A = {box_px * pixel_size_a:.0f} A); "
            "raise --box or --pixel-size"
        )
    target = (box_px // 2) * pixel_size_a
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(target - centre))))
    length_a = box_px * pixel_size_a
    calc = gemmi.DensityCalculatorE()
    calc.d_min = resolution_a if resolution_a is not None else 2 * pixel_size_a
    calc.grid.unit_cell = gemmi.UnitCell(length_a, length_a, length_a, 90, 90, 90)
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.grid.set_size(box_px, box_px, box_px)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    values = np.array(calc.grid, copy=True)  # indexed [x, y, z]
    return np.ascontiguousarray(values.transpose(2, 1, 0)).astype(np.float32)


def atomic_model_to_map(path: str | Path, *, pixel_size_a: float, box_px: int,
                        resolution_a: float | None = None) -> np.ndarray:
    """Electron-scattering potential of an atomic model, centred in a cubic box.

    The atoms of the first model are translated so that their centroid sits at the box centre
    (voxel ``box_px // 2``); the potential is computed by gemmi's ``DensityCalculatorE``
    (electron form factors) on the ``box_px^3`` grid, blurred to ``resolution_a``
    (default ``2 * pixel_size_a``, Nyquist).

    Parameters
    ----------
    path : .pdb, .cif or .mmcif file.
    pixel_size_a : voxel size in Angstrom.
    box_px : even box size in voxels.
    resolution_a : resolution of the map in Angstrom.

    Returns
    -------
    (box_px, box_px, box_px) float32 array indexed [z, y, x].
    """
    if box_px % 2:
        raise InputError(f"--box {box_px} is odd; cryoai needs even boxes")
    if pixel_size_a <= 0:
        raise InputError(f"--pixel-size must be positive (got {pixel_size_a})")
    structure = read_model(path)
    positions = np.array([a.pos.tolist() for chain in structure[0] for res in chain for a in res])
    if len(positions) == 0:
        raise InputError(f"{path}: the model holds no atoms")
    return model_potential(structure, None, None, positions.mean(axis=0), pixel_size_a=pixel_size_a,
                           box_px=box_px, resolution_a=resolution_a, source=str(path))
