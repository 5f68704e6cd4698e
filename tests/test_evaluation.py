"""Pose registration, volume alignment, metrics and the evaluate command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoai.cli.main import main as cryoai_main
from cryoai.evaluation.metrics import (
    align_rotations,
    align_volume,
    best_flip_fsc,
    evaluate,
    fsc_report,
    pose_agreement,
)
from cryoai.io import load_particles, read_volume, write_star, write_volume
from cryoai.physics.grids import grid_3d
from cryoai.physics.projection import sample_volume
from cryoai.physics.rotations import random_rotations

N = 32
PIXEL_A = 4.0
J = np.diag([1.0, 1.0, -1.0])




def _rotations(n: int, seed: int) -> np.ndarray:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).numpy()


def _global_rotation() -> np.ndarray:
    return _rotations(1, 123)[0]


def blobs(centres: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A smooth asymmetric volume: Gaussian blobs at ``centres`` (x, y, z), [z, y, x] indexed.

    Written analytically so a rotated copy is exact (no interpolation)."""
    c = np.arange(N) - N // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((N, N, N))
    for k, (cx, cy, cz) in enumerate(centres):
        r2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
        vol += (1.0 + 0.3 * k) * np.exp(-r2 / (2 * sigma**2))
    return vol


CENTRES = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 4.0, 0.0], [-3.0, -2.0, 5.0],
                    [2.0, -6.0, -3.0]])


def test_align_rotations_recovers_global_rotation():
    true = _rotations(300, 1)
    a = _global_rotation()
    reg = align_rotations(a @ true, true)
    assert reg["mirror"] is False
    np.testing.assert_allclose(reg["A"], a, atol=1e-8)
    assert float(np.max(reg["frobenius_sq"])) < 1e-12
    assert float(np.max(reg["angle_deg"])) < 1e-4


def test_align_rotations_detects_mirror():
    true = _rotations(300, 2)
    a = _global_rotation()
    pred = a @ J @ true @ J
    assert np.allclose(np.linalg.det(pred), 1.0)
    reg = align_rotations(pred, true)
    assert reg["mirror"] is True
    np.testing.assert_allclose(reg["A"], a, atol=1e-8)
    assert float(np.max(reg["frobenius_sq"])) < 1e-12


def test_pose_agreement_counts_particles_placed_alike_up_to_rotation_and_mirror():
    from scipy.spatial.transform import Rotation

    true = _rotations(400, 4)
    a = _global_rotation()
    # Another search's poses of the same particles: a global rotation and the mirror, 3 deg of
    # noise on each, and 40% of them posed at random (a search that failed there).
    jitter = Rotation.random(400, random_state=5).as_rotvec()
    jitter = Rotation.from_rotvec(jitter / np.linalg.norm(jitter, axis=1, keepdims=True)
                                  * np.radians(3.0)).as_matrix()
    other = a @ J @ (jitter @ true) @ J
    other[:160] = _rotations(160, 6)
    share = pose_agreement(true, other)
    assert 0.57 <= share <= 0.63  # the 240 placed alike, and at most a few random ones by chance
    assert pose_agreement(true, other, within_deg=2.0) < 0.3  # 3 deg apart: few within 2
    # Two unrelated sets of poses agree on almost none.
    assert pose_agreement(true, _rotations(400, 7)) < 0.03


def test_align_rotations_reports_errors():
    true = _rotations(200, 3)
    noisy = _rotations(200, 4)
    reg = align_rotations(noisy, true)
    assert float(np.median(reg["angle_deg"])) > 30  # unrelated poses are far apart


@pytest.mark.parametrize("mirror", [False, True])
def test_align_volume_brings_rotated_volume_back(mirror):
    a = _global_rotation()
    m = J if mirror else np.eye(3)
    truth = blobs(CENTRES)
    # V_p(x) = V(J^m A^T x): its blobs sit at A J^m c.
    moved = blobs(CENTRES @ (a @ m).T)
    before = fsc_report(moved, truth, PIXEL_A)["resolution_px_0.5"]
    aligned = align_volume(moved, a, mirror)
    after = fsc_report(aligned, truth, PIXEL_A)["resolution_px_0.5"]
    assert before > 6.0  # the rotated volume does not match as it is
    assert after <= 2.2
    assert np.corrcoef(aligned.ravel(), truth.ravel())[0, 1] > 0.98
    assert np.corrcoef(moved.ravel(), truth.ravel())[0, 1] < 0.5


def test_align_volume_with_sample_volume_rotation():
    """The same with a volume rotated by trilinear resampling (physics.projection)."""
    a = _global_rotation()
    truth = blobs(CENTRES)
    pts = grid_3d(N, dtype=torch.float64).reshape(-1, 3) @ torch.as_tensor(a)  # A^T x
    moved = sample_volume(torch.as_tensor(truth), pts).reshape(N, N, N).numpy()
    assert fsc_report(moved, truth, PIXEL_A)["resolution_px_0.5"] > 6.0
    aligned = align_volume(moved, a, False)
    # Two trilinear resamplings blur the highest shells; up to half Nyquist it is exact.
    curve = np.array(fsc_report(aligned, truth, PIXEL_A)["fsc"])
    assert curve[: N // 4 + 1].min() > 0.99
    assert np.corrcoef(aligned.ravel(), truth.ravel())[0, 1] > 0.97


def test_evaluate_perfect_inputs():
    vol = blobs(CENTRES)
    rot = _rotations(100, 5)
    shifts = np.random.default_rng(0).normal(size=(100, 2)) * 5
    res = evaluate(vol, PIXEL_A, truth_volume=vol, pred_rotations=rot, true_rotations=rot,
                   pred_shifts_a=shifts, true_shifts_a=shifts)
    m = res["metrics"]
    assert m["resolution_px_0.5"] == 2.0
    assert m["resolution_a_0.5"] == pytest.approx(2.0 * PIXEL_A)
    assert m["rotation_error_frobenius_sq_median"] < 1e-12
    assert m["rotation_error_deg_median"] < 1e-4
    assert m["alignment_mirror"] is False
    assert m["shift_error_a_median"] == 0.0
    assert m["fraction_within_10deg"] == 1.0
    assert m["alignment_translation_px"] == pytest.approx([0, 0, 0], abs=1e-9)
    json.dumps(m)  # JSON-ready


def test_evaluate_undoes_global_rotation_and_mirror():
    truth = blobs(CENTRES)
    rot = _rotations(100, 6)
    a = _global_rotation()
    pred = a @ J @ rot @ J
    moved = blobs(CENTRES @ (a @ J).T)
    m = evaluate(moved, PIXEL_A, truth_volume=truth, pred_rotations=pred, true_rotations=rot)["metrics"]
    assert m["alignment_mirror"] is True
    assert m["rotation_error_deg_median"] < 1e-4
    assert m["resolution_px_0.5"] <= 2.2


def test_best_flip_fsc_finds_the_mirror():
    truth = blobs(CENTRES)
    mirrored = blobs(CENTRES @ J)  # V(x, y, -z)
    rep = best_flip_fsc(mirrored, truth, PIXEL_A)
    assert rep.get("mirrored") is True
    assert rep["resolution_px_0.5"] == 2.0
    rep = best_flip_fsc(truth, truth, PIXEL_A)
    assert "mirrored" not in rep and rep["resolution_px_0.5"] == 2.0


@pytest.fixture(scope="module")
def tiny_sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalsim") / "sim"
    rc = cryoai_main(["simulate", "--box", str(N), "--n", "40", "--no-noise", "--shift-sigma-a", "5",
                      "--outdir", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    return out


def test_evaluate_cli(tiny_sim, tmp_path):
    truth_table = load_particles(tiny_sim / "particles.star")
    truth, voxel = read_volume(tiny_sim / "ground_truth.mrc")
    a = _global_rotation()
    # The answer up to a global rotation: poses A R, map V(A^T x).
    pred_star = tmp_path / "pred.star"
    write_star(pred_star, truth_table.with_poses(a @ truth_table.rotations, truth_table.shifts_a))
    pts = grid_3d(N, dtype=torch.float64).reshape(-1, 3) @ torch.as_tensor(a)
    moved = sample_volume(torch.as_tensor(truth, dtype=torch.float64), pts).reshape(N, N, N)
    map_path = tmp_path / "map.mrc"
    write_volume(map_path, moved.float().numpy(), voxel)

    outdir = tmp_path / "eval"
    rc = cryoai_main(["evaluate", "--map", str(map_path), "--poses", str(pred_star),
                      "--gt-map", str(tiny_sim / "ground_truth.mrc"),
                      "--gt-poses", str(tiny_sim / "particles.star"), "--outdir", str(outdir)])
    assert rc == 0
    for name in ("metrics.json", "fsc.png", "rotation_errors.png"):
        assert (outdir / name).is_file() and (outdir / name).stat().st_size > 0, name
    m = json.loads((outdir / "metrics.json").read_text())
    assert m["rotation_error_deg_median"] < 1e-2
    assert m["alignment_mirror"] is False
    np.testing.assert_allclose(m["alignment_rotation"], a, atol=1e-5)
    assert m["shift_error_a_median"] < 1e-3
    assert m["resolution_px_0.5"] <= 3.0
    assert m["pixel_size_a"] == pytest.approx(voxel)


def _c4_blobs() -> np.ndarray:
    """A volume with C4 symmetry about z: the blobs of CENTRES and their copies turned by 90 deg."""
    copies = [CENTRES[:, [0, 1, 2]]]
    for _ in range(3):
        c = copies[-1]
        copies.append(np.stack([-c[:, 1], c[:, 0], c[:, 2]], axis=1))
    return sum(blobs(c, sigma=1.2) for c in copies)


def test_symmetric_map_projects_alike_at_its_equivalent_poses():
    from cryoai.physics.projection import project_real_space
    from cryoai.physics.symmetry import point_group

    group = point_group("C4")
    assert group.shape == (4, 3, 3)
    volume = torch.as_tensor(_c4_blobs())
    poses = torch.as_tensor(_rotations(3, 11))
    reference = project_real_space(volume, poses)
    scale = float(reference.abs().max())
    for s in group[1:]:
        same = project_real_space(volume, s @ poses)  # S R: the same images
        other = project_real_space(volume, poses @ s)  # R S: images turned in plane
        assert float((same - reference).abs().max()) < 1e-6 * scale
        assert float((other - reference).abs().max()) > 0.1 * scale


def test_point_groups_are_groups_and_bad_symbols_are_refused():
    from cryoai.errors import InputError
    from cryoai.physics.symmetry import point_group

    for symbol, order in (("C1", 1), ("c4", 4), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24), ("I1", 60),
                          ("i2", 60), ("I3", 60), ("I4", 60)):
        g = point_group(symbol)
        assert len(g) == order
        torch.testing.assert_close(g[0], torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(g @ g.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(g))
        assert torch.allclose(torch.linalg.det(g), torch.ones(order, dtype=torch.float64))  # rotations
        products = (g[:, None] @ g[None]).reshape(-1, 9)
        distance = torch.cdist(products, g.reshape(-1, 9))
        assert float(distance.min(dim=1).values.max()) < 1e-6  # closed under products
        assert float(torch.cdist(g.reshape(-1, 9), g.reshape(-1, 9)).add(torch.eye(order)).min()) > 0.1
    for bad in ("I", "I5", "C0", "O2", "D", "T2"):
        with pytest.raises(InputError, match="symmetry"):
            point_group(bad)


def _has_axis(symbol, fold, direction):
    from cryoai.physics.symmetry import group_axes, point_group

    v = torch.tensor(direction, dtype=torch.float64)
    v = v / v.norm()
    return any(f == fold and min(float((a - v).abs().max()), float((a + v).abs().max())) < 1e-6
               for f, a in group_axes(point_group(symbol)))


def test_point_groups_sit_where_relion_puts_their_axes():
    """RELION's documented settings ("Conventions", Symmetry): the axes each group must have."""
    import math

    from cryoai.physics.symmetry import PHI, group_axes, point_group

    x, y, z = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    assert _has_axis("C6", 6, z) and _has_axis("D7", 7, z) and _has_axis("D7", 2, x)
    # T: a three-fold on z (RELION's own setting), a two-fold in the yz plane at 54.74 deg from z
    assert _has_axis("T", 3, z) and _has_axis("T", 2, (0, math.sqrt(2), 1)) and not _has_axis("T", 2, z)
    assert all(_has_axis("O", 4, a) for a in (x, y, z))
    for setting in ("I1", "I2"):  # the 222 settings: two-folds on x, y and z
        assert all(_has_axis(setting, 2, a) for a in (x, y, z))
    assert _has_axis("I1", 5, (0, 1, PHI)) and not _has_axis("I1", 5, (1, 0, PHI))  # five-folds in yz
    assert _has_axis("I2", 5, (1, 0, PHI)) and not _has_axis("I2", 5, (0, 1, PHI))  # in xz (Crowther)
    for setting, side in (("I3", -1), ("I4", 1)):  # five-fold on z, two-fold on y ...
        assert _has_axis(setting, 5, z) and _has_axis(setting, 2, y)
        # ... and, seen from +z, a five-fold next to z in the xz plane on the -x (I3) or +x (I4) side
        near = [a * torch.sign(a[2]) for f, a in group_axes(point_group(setting))
                if f == 5 and abs(abs(float(a[2])) - 1 / math.sqrt(5)) < 1e-6]
        in_xz = [float(a[0]) for a in near if abs(float(a[1])) < 1e-6]
        assert len(in_xz) == 1 and in_xz[0] * side > 0


def test_an_asymmetric_unit_holds_one_of_every_set_of_equivalent_poses():
    from cryoai.physics.rotations import random_rotations, so3_grid
    from cryoai.physics.symmetry import asymmetric_unit, point_group

    poses = random_rotations(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = so3_grid(4608, dtype=torch.float64)
    for symbol in ("C4", "D7", "O", "I1"):
        group = point_group(symbol)
        # of the G equivalents S R of a pose, exactly one lies in the unit (generic poses)
        orbits = torch.einsum("kab,nbc->nkac", group, poses)  # (n, G, 3, 3)
        inside = asymmetric_unit(orbits.reshape(-1, 3, 3), group).reshape(len(poses), len(group))
        assert bool((inside.sum(dim=1) == 1).all()), symbol
        # a uniform grid keeps about 1/G of its rotations; a margin keeps more
        kept = int(asymmetric_unit(grid, group).sum())
        assert abs(kept * len(group) / len(grid) - 1) < 0.05, symbol
        assert int(asymmetric_unit(grid, group, 0.25).sum()) > 1.2 * kept


def test_align_rotations_measures_errors_up_to_the_symmetry():
    from cryoai.physics.symmetry import point_group

    group = point_group("C4").numpy()
    true = _rotations(400, 21)
    gen = np.random.default_rng(0)
    element = gen.integers(0, 4, size=len(true))
    a = _global_rotation()
    jitter = _small_rotations(len(true), 2.0, seed=5)  # about 2 deg each
    pred = jitter @ a @ group[element] @ true
    plain = align_rotations(pred, true)
    assert np.median(plain["angle_deg"]) > 45  # each pose a random equivalent: far off
    reg = align_rotations(pred, true, symmetry=torch.as_tensor(group))
    assert reg["mirror"] is False and np.median(reg["angle_deg"]) < 3
    # Mirrored, the same.
    mirrored = align_rotations(J @ pred @ J, true, symmetry=torch.as_tensor(group))
    assert mirrored["mirror"] is True and np.median(mirrored["angle_deg"]) < 3


def _small_rotations(n: int, angle_deg: float, seed: int) -> np.ndarray:
    from cryoai.physics.rotations import axis_angle_to_matrix

    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(n, 3, generator=gen, dtype=torch.float64) * np.radians(angle_deg) / np.sqrt(3)
    return axis_angle_to_matrix(vec).numpy()
