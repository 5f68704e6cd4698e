"""A stand-in for the membrane recipe's map, at the recipe's own box and pixel size.

The low-SNR recipe of realistic-data-evidence.md (section 6, B) is a small membrane protein,
CFTR (PDB 6MSM, about 170 kDa) in a soft detergent belt (about 0.3 of the protein's density,
about 35 A thick), in a 64 px box at 3 A/px. Neither CFTR nor any map of that size and sampling
is in ../shared/data; its TRPV1 map is 48 px at 4.88 A (Nyquist 9.8 A, and at the recipe's
whole-box SNR of -15.5 dB an ISNR of 66, the low end of the recipe's 60-200 instead of its
median 115). So this script builds a map of CFTR's mass, size and sampling from the atomic
models that are there: seven copies of adenylate kinase (1AKE and 4AKE, 24 kDa each, alternate),
each turned at random, in three layers about 35 A apart (three, two and two copies: about
120 A tall, no symmetry), with a belt about the upper layer. It stands for CFTR only in what the
robustness issue's figures depend on: mass, extent, detail to Nyquist (gemmi's potential at
6 A), and the belt's low-resolution density. It is a bench input, built where it is needed and
never kept in git.

Example::

    python bench/membrane_surrogate.py /tmp/membrane_surrogate_64px_3A.mrc
    cryoai simulate --recipe membrane --map /tmp/membrane_surrogate_64px_3A.mrc --n 8000 ...
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from cryoai.io import write_volume
from cryoai.simulate.atomic import atomic_model_to_map

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "models"
#: The shared atomic models the surrogate is made of (../shared/data/README.md).
ADK_MODELS = (SHARED_MODELS / "1AKE_adk_closed_MDAnalysisTests.pdb",
              SHARED_MODELS / "4AKE_adk_open_MDAnalysisTests.pdb")
#: Centres of the copies (A, about the assembly's centre): three in the belt's layer, two below,
#: two more below and off the axis (as CFTR's nucleotide-binding domains hang below its membrane
#: domain).
CENTRES_A = ((0, 24, 34), (21, -12, 34), (-21, -12, 34), (12, 8, 0), (-14, -6, -2), (20, 4, -36),
             (-18, -10, -34))
#: CFTR's mass over the protein's density (1.21 A^3 per Da): the protein's volume.
PROTEIN_VOLUME_A3 = 170_000 * 1.21


def assembly_model(path: Path, models=ADK_MODELS, centres_a=CENTRES_A, seed: int = 7) -> Path:
    """A PDB file of one copy of ``models[i % len(models)]`` (heavy atoms, turned at random) at
    each of ``centres_a``, written to ``path``."""
    import gemmi

    rng = np.random.default_rng(seed)
    out = gemmi.Structure()
    out.cell = gemmi.UnitCell(1, 1, 1, 90, 90, 90)
    model = gemmi.Model("1")
    sources = [gemmi.read_structure(str(path)) for path in models]
    for source in sources:
        source.setup_entities()
        source.remove_ligands_and_waters()
    for i, centre in enumerate(np.asarray(centres_a, dtype=float)):
        source = sources[i % len(sources)]
        atoms = [a for ch in source[0] for r in ch for a in r]
        xyz = np.array([a.pos.tolist() for a in atoms])
        turn = Rotation.random(random_state=int(rng.integers(1 << 30))).as_matrix()
        moved = (xyz - xyz.mean(axis=0)) @ turn.T + centre
        chain = gemmi.Chain(chr(ord("A") + i))
        k = 0
        for residue in (r for ch in source[0] for r in ch):
            new = gemmi.Residue()
            new.name, new.seqid, new.entity_type = residue.name, residue.seqid, gemmi.EntityType.Polymer
            for atom in residue:
                pos = moved[k]
                k += 1
                if atom.element.name == "H":
                    continue
                a = gemmi.Atom()
                a.name, a.element, a.occ, a.b_iso = atom.name, atom.element, 1.0, 20.0
                a.pos = gemmi.Position(*pos)
                new.add_atom(a)
            chain.add_residue(new)
        model.add_chain(chain)
    out.add_model(model)
    out.setup_entities()
    out.write_pdb(str(path))
    return path


def build(path: Path, *, pixel_size_a: float = 3.0, box_px: int = 64, belt_fraction: float = 0.3,
          belt_thickness_a: float = 35.0, belt_radius_a: float = 62.0, seed: int = 7) -> Path:
    """The surrogate map (``box_px``^3 at ``pixel_size_a``), written to ``path`` (MRC).

    The belt is a slab ``belt_thickness_a`` thick about the upper layer's height, out to
    ``belt_radius_a`` from the axis, outside the protein, at ``belt_fraction`` of the protein's
    mean density, with edges softened over 6 A (a disordered belt holds no detail finer).
    """
    with tempfile.TemporaryDirectory() as tmp:
        pdb = assembly_model(Path(tmp) / "assembly.pdb", seed=seed)
        volume = atomic_model_to_map(pdb, pixel_size_a=pixel_size_a, box_px=box_px).astype(np.float64)
    # atomic_model_to_map centres the atoms' centroid; the copies are alike, so their centres'
    # mean is the centroid, and the upper layer lies at its height above it.
    centres = np.asarray(CENTRES_A, dtype=float)
    layer_z_px = (centres[:3, 2].mean() - centres[:, 2].mean()) / pixel_size_a + box_px // 2
    smooth = gaussian_filter(volume, 1.0)
    n_protein = int(PROTEIN_VOLUME_A3 / pixel_size_a**3)
    protein = smooth >= np.sort(smooth.ravel())[-n_protein]
    c = np.arange(box_px) - box_px // 2
    z, y, x = np.meshgrid(np.arange(box_px), c, c, indexing="ij")
    belt = ((np.hypot(x, y) * pixel_size_a < belt_radius_a)
            & (np.abs(z - layer_z_px) * pixel_size_a < belt_thickness_a / 2) & ~protein)
    belt = gaussian_filter(belt.astype(np.float64), 6.0 / pixel_size_a)
    volume += belt_fraction * volume[protein].mean() * belt
    write_volume(path, volume.astype(np.float32), pixel_size_a)
    return path


def available() -> bool:
    """Whether the shared atomic models are here."""
    return all(p.exists() for p in ADK_MODELS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the map to write (.mrc)")
    p.add_argument("--pixel-size", type=float, default=3.0)
    p.add_argument("--box", type=int, default=64)
    args = p.parse_args()
    if not available():
        raise SystemExit(f"{ADK_MODELS[0].parent}: the shared atomic models are not here")
    print(build(args.out, pixel_size_a=args.pixel_size, box_px=args.box))


if __name__ == "__main__":
    main()
