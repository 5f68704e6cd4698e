"""Ab initio of symmetric complexes with ``--sym``: the axes found, the map against the known-pose
symmetric map and against the same run in C1, the pose errors to the nearest equivalent pose.

The sets (``--sets``):

- ``C4``: the TRPV1 channel of ../shared/data/maps (48 px, 4.88 A, C4 about z as written);
- ``D7``, ``O``, ``I1``: assemblies built from the closed adenylate kinase model of
  ../shared/data/models: one copy's atoms turned at random and placed off every axis at
  ``RADIUS_A`` from the centre, then copied by every operator of the group (on the atoms, so the
  assembly is exactly symmetric), the potential of all copies by gemmi at 4 A per pixel (14, 24
  and 60 subunits: a D7 double ring, an octahedral cage and an icosahedral shell, 64 px).

For each set: ``cryoai simulate`` (``--n`` particles, ``--snr-db``); ``cryoai train --poses`` at
the true poses with ``--sym`` (the known-pose symmetric map); ``cryoai train --sym G`` and the
same run in C1 (``--sym C1``), both evaluated against the truth with ``cryoai evaluate
--symmetry G``. The axes' error is the largest angle between the group's operators as the run
placed them (its poses aligned to the truth's by the evaluation's global rotation ``A``:
``A G A^T``) and the truth's. With ``--wrong`` a run asks the C4 set for C6 and says whether
it was caught; with ``--auto`` the C4 set and the asymmetric 70S are run with ``--sym auto``.

Example:
  python bench/bench_symmetry.py --outdir /tmp/bench-sym --sets C4 D7 O I1 --wrong --auto
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryoai.cli.main import main as cli
from cryoai.physics.grids import grid_3d
from cryoai.physics.projection import sample_volume
from cryoai.physics.rotations import random_rotations
from cryoai.physics.symmetry import point_group
from cryoai.simulate.atomic import model_potential, read_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Subunit placement (A from the centre) per group: about as far as the subunits need to sit
#: side by side (adenylate kinase is about 45 A across).
RADIUS_A = {"D7": 48.0, "O": 58.0, "I1": 90.0}


def turned(volume: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``volume(m x)`` about the box centre, trilinear."""
    g = grid_3d(volume.shape[-1], dtype=volume.dtype)
    return sample_volume(volume, torch.einsum("ij,zyxj->zyxi", m.to(volume.dtype), g))


def assembly(model: Path, symbol: str, *, box_px: int = 64, pixel_size_a: float = 4.0,
             seed: int = 0) -> np.ndarray:
    """A symmetric assembly of copies of ``model`` (module docstring): the atoms of one copy
    turned at random about their centroid and moved off every axis, then turned by each operator
    ``S`` of the group about the box centre (exactly, on the atoms), each copy's potential
    computed by gemmi and the copies' potentials summed.
    """
    structure = read_model(model)
    keys = [(ch.name, res.seqid.num, res.name, a.name) for ch in structure[0] for res in ch for a in res]
    atoms = np.array([a.pos.tolist() for ch in structure[0] for res in ch for a in res])
    gen = torch.Generator().manual_seed(seed)
    turn = random_rotations(1, generator=gen, dtype=torch.float64)[0].numpy()
    direction = np.array([0.31, 0.52, 0.79])  # off every axis
    if symbol.startswith("D"):
        direction = np.array([0.93, 0.17, 0.33])  # a ring, above the plane
    offset = direction / np.linalg.norm(direction) * RADIUS_A[symbol]
    copy = (atoms - atoms.mean(axis=0)) @ turn.T + offset  # A, about the assembly's centre
    total = np.zeros((box_px,) * 3, dtype=np.float64)
    for s in point_group(symbol).numpy():
        total += model_potential(structure, keys, copy @ s.T, np.zeros(3), pixel_size_a=pixel_size_a,
                                 box_px=box_px, source=str(model))
    return total.astype(np.float32)


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(f"failed ({code}): cryoai {' '.join(args)}")
    return time.perf_counter() - t0


def evaluated(run_dir: Path, sim: Path, symbol: str) -> dict:
    out = run_dir.parent / f"{run_dir.name}-eval"
    poses = ["--poses", str(run_dir / "poses.star"), "--gt-poses", str(sim / "particles.star")]
    run(["evaluate", "--map", str(run_dir / "volume.mrc"), "--gt-map", str(sim / "ground_truth.mrc"),
         *(poses if (run_dir / "poses.star").exists() else []), "--outdir", str(out), "--symmetry", symbol])
    return json.loads((out / "metrics.json").read_text())


def axes_error_deg(alignment: list, symbol: str) -> float:
    """The largest angle between the group's operators as the run placed them (``A G A^T``) and
    the truth's (``G``)."""
    group = point_group(symbol)
    a = torch.as_tensor(alignment, dtype=torch.float64)
    placed = a @ group @ a.T
    d = float(torch.cdist(placed.reshape(-1, 9), group.reshape(-1, 9)).min(dim=1).values.max())
    return math.degrees(2 * math.asin(min(1.0, d / (2 * math.sqrt(2)))))


def outputs(run_dir: Path) -> dict:
    return json.loads((run_dir / "outputs.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--sets", nargs="+", default=["C4", "D7", "O", "I1"], choices=["C4", "D7", "O", "I1"])
    p.add_argument("--n", type=int, default=2000, help="particles per set")
    p.add_argument("--snr-db", type=float, default=-10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrong", action="store_true", help="also run the C4 set with --sym C6")
    p.add_argument("--auto", action="store_true", help="also run --sym auto on the C4 set and the 70S")
    p.add_argument("--trpv1", type=Path, default=SHARED / "maps" / "cryojax_trpv1_volume_48px_4.88A.mrc")
    p.add_argument("--model", type=Path, default=SHARED / "models" / "1AKE_adk_closed_MDAnalysisTests.pdb")
    p.add_argument("--ribosome", type=Path, default=SHARED / "aspire-70s" / "snr0.1" / "particles.star")
    args = p.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for symbol in args.sets:
        base = args.outdir / symbol
        base.mkdir(exist_ok=True)
        if symbol == "C4":
            source = args.trpv1
        else:
            source = base / "assembly.mrc"
            with mrcfile.new(source, overwrite=True) as f:
                f.set_data(assembly(args.model, symbol, seed=args.seed))
                f.voxel_size = 4.0
        sim = base / "sim"
        run(["simulate", "--map", str(source), "--n", str(args.n), "--snr-db", str(args.snr_db),
             "--shift-sigma-a", "5", "--seed", str(args.seed + 1), "--outdir", str(sim), "--force",
             "--quiet"])
        star = str(sim / "particles.star")
        row: dict = {"set": symbol, "particles": args.n}
        known = base / "known"
        row["known_seconds"] = run(["train", star, "--poses", star, "--sym", symbol, "--outdir", str(known),
                                    "--seed", str(args.seed), "--quiet", "--force"])
        row["known_fsc05_px"] = evaluated(known, sim, symbol)["resolution_px_0.5"]
        for sym in (symbol, "C1"):
            out = base / f"abinitio-{sym}"
            seconds = run(["train", star, "--sym", sym, "--outdir", str(out), "--seed", str(args.seed),
                           "--quiet", "--force"])
            m = evaluated(out, sim, symbol)
            tag = "sym" if sym != "C1" else "c1"
            row.update({f"{tag}_seconds": seconds, f"{tag}_fsc05_px": m["resolution_px_0.5"],
                        f"{tag}_median_deg": m["rotation_error_deg_median"],
                        f"{tag}_imposed": outputs(out).get("symmetry")})
            if sym != "C1":
                row["axes_error_deg"] = axes_error_deg(m["alignment_rotation"], symbol)
        row["sym_over_known"] = row["sym_fsc05_px"] / row["known_fsc05_px"]
        row["sym_over_c1_fsc"] = row["sym_fsc05_px"] / row["c1_fsc05_px"]
        row["sym_over_c1_deg"] = row["sym_median_deg"] / row["c1_median_deg"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.wrong and (args.outdir / "C4" / "sim" / "particles.star").exists():
        out = args.outdir / "C4" / "abinitio-C6"
        run(["train", str(args.outdir / "C4" / "sim" / "particles.star"), "--sym", "C6", "--outdir", str(out),
             "--seed", str(args.seed), "--quiet", "--force"])
        o = outputs(out)
        caught = o.get("symmetry") == "C1" and any("--sym C6" in w for w in o.get("warnings", []))
        print(json.dumps({"wrong": "C6 on C4", "imposed": o.get("symmetry"), "caught": caught}), flush=True)
    if args.auto:
        for name, star in (("C4", args.outdir / "C4" / "sim" / "particles.star"), ("70S", args.ribosome)):
            if not Path(star).exists():
                continue
            out = args.outdir / f"auto-{name}"
            run(["train", str(star), "--sym", "auto", "--outdir", str(out), "--seed", str(args.seed),
                 "--quiet", "--force"])
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            stage = next(r for r in log if r.get("stage") == "symmetry")
            print(json.dumps({"auto": name, "proposed": stage.get("proposed"),
                              "seconds": stage.get("seconds"), "tested": stage.get("tested")}), flush=True)
    print("set   known FSC0.5  sym FSC0.5 (x known)  C1 FSC0.5  sym/C1  median deg sym / C1   axes deg")
    for r in rows:
        print(f"{r['set']:4s}  {r['known_fsc05_px']:8.2f} px  {r['sym_fsc05_px']:6.2f} px "
              f"({r['sym_over_known']:.2f}x)  {r['c1_fsc05_px']:7.2f} px  {r['sym_over_c1_fsc']:.2f}x  "
              f"{r['sym_median_deg']:6.2f} / "
              f"{r['c1_median_deg']:.2f}  {r['axes_error_deg']:8.2f}")


if __name__ == "__main__":
    main()
