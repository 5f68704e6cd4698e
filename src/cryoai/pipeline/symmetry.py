"""The symmetry stage (``--sym``): the search's C1 map put in its point group's standard frame,
checked against the data, and symmetrised (docs/pipeline.md#symmetry).

As RELION's initial model and cryoSPARC's ab initio do, the search itself runs in C1 (a
symmetric start converges worse). Then, on the search's subset:

1. the subset's map is centred (a symmetric molecule's centre of mass lies on every axis) and
   its C1 half maps are made;
2. the rotation ``Q`` that puts the group's axes where RELION puts them is found in the map
   (:func:`cryoai.reconstruction.symmetry_axes.find_symmetry_frame`);
3. the group is checked against the data: each operator must turn one half map into a copy that
   agrees with the other about as well as the halves agree
   (:func:`cryoai.reconstruction.symmetry_axes.half_map_agreement`, the policy's
   ``symmetry_min_agreement``); a group the data do not support is said and not imposed;
4. the subset's poses are turned into the standard frame (``Q R``) and its map is made again
   with every particle inserted once per operator: the map the other particles are posed against.

``--sym auto`` tests the common groups (Cn up to C12, Dn where Cn holds, T, O and I where their
axes' cyclic groups hold) and proposes the largest that passes, without imposing it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..physics.fft import ifft3_c
from ..physics.poses import Poses
from ..physics.symmetry import point_group, rotation_angle
from ..reconstruction.pose_search import SubsetSearch, centre_poses
from ..reconstruction.regularised import half_set_sums, reconstruction_from_sums
from ..reconstruction.spectra import SpectraInMemory
from ..reconstruction.symmetry_axes import find_symmetry_frame, half_map_agreement
from ..training.config import TrainConfig
from . import decisions
from .records import Particles, SymmetryRecord
from .settings import mask_radius_px

#: The largest n of the cyclic and dihedral groups ``--sym auto`` tests.
AUTO_MAX_FOLD = 12


def wants_symmetry(cfg: TrainConfig) -> bool:
    """Whether the run has a symmetry stage: a group other than C1, or ``auto``. Then the
    search's views also go unjudged (no retry for them, no view balancing): in C1, the poses of
    a molecule with G-fold symmetry may each take any of G equivalents and gather in one
    asymmetric unit (SCF* 0.08-0.13 on an octahedral set of uniform views), which is not a
    preferred view; the views are judged at the end, with every pose's equivalents.
    """
    return cfg.sym.strip().upper() not in ("C1", "")


def _axis(op: torch.Tensor) -> str:
    w, v = torch.linalg.eigh((op + op.T) / 2)
    a = v[:, int((w - 1).abs().argmin())]
    a = a * (1 if float(a[a.abs() > 1e-6][0]) > 0 else -1)
    return "(" + ", ".join(f"{float(x):.2f}" for x in a) + ")"


def _test(volume: torch.Tensor, half_maps, symbol: str, cfg: TrainConfig, seed: int) -> dict:
    """One group: its frame in the map and each operator's agreement."""
    group = point_group(symbol)
    frame = find_symmetry_frame(volume, group, generator=torch.Generator().manual_seed(seed))
    halves, agreement = half_map_agreement(half_maps, group, frame.rotation,
                                           box_px=min(cfg.policy.symmetry_box_px, volume.shape[-1]))
    holds = decisions.symmetry_holds(agreement, cfg.policy)
    return {"symbol": symbol, "group": group, "rotation": frame.rotation, "agreement": agreement,
            "halves": halves, "holds": bool(holds.all()), "held": holds}


def _auto(volume: torch.Tensor, half_maps, cfg: TrainConfig, say: Callable[[str], None]) -> list[dict]:
    """Every common group tested (module docstring), in order of testing."""
    tested: list[dict] = []
    held: dict[str, bool] = {}

    def test(symbol: str) -> dict:
        out = _test(volume, half_maps, symbol, cfg, cfg.seed)
        tested.append(out)
        held[symbol] = out["holds"]
        say(f"symmetry auto: {symbol} {'holds' if out['holds'] else 'fails'} (worst operator "
            f"{float(out['agreement'][1:].min()):.2f} of the half maps' agreement)")
        return out

    for n in range(2, AUTO_MAX_FOLD + 1):
        test(f"C{n}")
    for n in range(2, AUTO_MAX_FOLD + 1):
        if held[f"C{n}"]:
            test(f"D{n}")
    if held["C3"] and held["C2"]:
        test("T")
    if held["C4"] and held["C3"]:
        test("O")
    if held["C5"] and held["C3"] and held["C2"]:
        test("I1")
    return tested


def symmetry_stage(particles: Particles, cfg: TrainConfig, found: SubsetSearch, *,
                   say: Callable[[str], None] = print) -> SymmetryRecord:
    """Steps 1-4 of the module docstring on the search's subset (``particles``: the particles
    the search saw, at its working box). Returns the subset's search in the standard frame
    with its map symmetrised, or as it was (centred) where the group is not imposed.
    """
    t0 = time.perf_counter()
    formation = particles.formation
    radius = mask_radius_px(cfg, particles.box_px)
    rotations = found.rotations.double().cpu().numpy()
    shifts_px = centre_poses(found.fourier_volume, rotations, found.shifts_px.double().cpu().numpy())
    subset = SpectraInMemory(found.spectra, found.ctf, formation)
    rot = torch.as_tensor(rotations, dtype=torch.float32)
    shifts_a = torch.as_tensor(shifts_px * formation.pixel_size_a, dtype=torch.float32)
    c1 = reconstruction_from_sums(half_set_sums(subset, Poses(rot, shifts_a), seed=cfg.seed),
                                  mask_radius_px=radius)
    volume = ifft3_c(c1.fourier_volume).real.cpu()
    half_maps = tuple(h.cpu() for h in c1.half_maps)
    centred = replace(found, shifts_px=torch.as_tensor(shifts_px, dtype=found.shifts_px.dtype,
                                                       device=found.shifts_px.device))
    asked = cfg.sym.strip().upper()
    figures: dict = {"stage": "symmetry", "asked": asked}
    if asked == "AUTO":
        tested = _auto(volume, half_maps, cfg, say)
        passing = [t for t in tested if t["holds"]]
        best = max(passing, key=lambda t: len(t["group"])) if passing else None
        figures.update(proposed=best["symbol"] if best else "C1", imposed="C1",
                       tested={t["symbol"]: round(float(t["agreement"][1:].min()), 4) for t in tested},
                       seconds=time.perf_counter() - t0)
        said = (
            f"symmetry auto: the map obeys {best['symbol']} (every operator at least "
            f"{float(best['agreement'][1:].min()):.2f} of the half maps' agreement); nothing is imposed: "
            f"run again with --sym {best['symbol']} to impose it" if best else
            "symmetry auto: the map obeys none of the groups tested (C2-C12, Dn, T, O, I); it stays C1"
        )
        return SymmetryRecord("symmetry", figures, (said,), found=centred)
    test = _test(volume, half_maps, asked, cfg, cfg.seed)
    agreement, group = test["agreement"], test["group"]
    figures.update(agreement=[round(float(a), 4) for a in agreement], halves_correlation=test["halves"],
                   rotation=test["rotation"].tolist())
    worst = int(agreement.argmin())
    if not test["holds"]:
        failing = [k for k in range(len(group)) if not test["held"][k]]
        figures.update(imposed="C1", seconds=time.perf_counter() - t0)
        op = group[worst]
        op_deg = math.degrees(float(rotation_angle(op)))
        warning = (
            f"{particles.source}: the data do not support --sym {asked}: {len(failing)} of its "
            f"{len(group) - 1} operators disagree (worst: {op_deg:.0f} deg about "
            f"{_axis(op)}, {float(agreement[worst]):.2f} of the half maps' agreement, below "
            f"{cfg.policy.symmetry_min_agreement}); the run goes on in C1 (--sym auto proposes a group)"
        )
        return SymmetryRecord("symmetry", figures, warnings=(warning,), found=centred)
    q = test["rotation"].to(torch.float32)
    rot_std = q @ rot
    sym = reconstruction_from_sums(
        half_set_sums(subset, Poses(rot_std, shifts_a), seed=cfg.seed, symmetry=group.float()),
        mask_radius_px=radius)
    device = found.rotations.device
    turned = replace(centred, rotations=rot_std.to(device=device, dtype=found.rotations.dtype),
                     fourier_volume=sym.fourier_volume.to(found.fourier_volume.dtype))
    seconds = time.perf_counter() - t0
    figures.update(imposed=asked, seconds=seconds)
    others = agreement[1:]
    said = (
        f"symmetry: {asked} found in the search's map and imposed from here on ({len(group)} operators, "
        f"each {float(others.min()):.2f}-{float(others.max()):.2f} of the half maps' agreement "
        f"{test['halves']:.2f}); map and poses in RELION's frame for {asked}; {seconds:.0f} s"
    )
    return SymmetryRecord("symmetry", figures, (said,), found=turned, imposed=asked,
                          operators=group.float(), rotation=q)


def given_symmetry(cfg: TrainConfig) -> SymmetryRecord:
    """``--poses`` runs: the group imposed as given (the poses are taken to be in its standard
    frame, as RELION's are); ``--sym auto`` is refused there (nothing is searched).
    """
    asked = cfg.sym.strip().upper()
    group = point_group(asked)
    said = (f"symmetry: {asked} imposed at the given poses (taken to be in RELION's frame for {asked})",)
    return SymmetryRecord("symmetry", {"stage": "symmetry", "asked": asked, "imposed": asked}, said,
                          imposed=asked, operators=group.float())


__all__ = ["AUTO_MAX_FOLD", "given_symmetry", "symmetry_stage", "wants_symmetry"]
