"""Rotations against scipy.spatial.transform and closed-form identities."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation

from cryoai.physics.rotations import (
    axis_angle_to_matrix,
    euler_zyz_to_matrix,
    frobenius_distance_sq,
    frobenius_sq_to_angle,
    geodesic_distance,
    in_plane_180,
    matrix_to_axis_angle,
    matrix_to_euler_zyz,
    matrix_to_rotation_6d,
    procrustes_rotation,
    quaternion_to_matrix,
    random_rotations,
    rot_y,
    rot_z,
    rotation_6d_to_matrix,
    so3_grid,
)

F64 = torch.float64


def _random_euler(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-np.pi, np.pi, n), rng.uniform(0, np.pi, n),
                     rng.uniform(-np.pi, np.pi, n)], -1)


def _scipy_rotations(n: int, seed: int) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def _assert_rotations(r: torch.Tensor, atol: float = 1e-12, what: str = "matrices"):
    eye = torch.eye(3, dtype=r.dtype).expand_as(r)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, rtol=0, atol=atol,
                               msg=f"{what} are not orthonormal")
    det = torch.linalg.det(r)
    torch.testing.assert_close(det, torch.ones_like(det), rtol=0, atol=atol,
                               msg=f"{what} do not have determinant +1")


# ----------------------------------------------------------------------------- Euler angles


def test_elementary_rotations_match_scipy():
    angles = np.linspace(-3.0, 3.0, 7)
    t = torch.from_numpy(angles)
    for fn, axis in [(rot_z, "z"), (rot_y, "y")]:
        ref = Rotation.from_euler(axis, angles[:, None]).as_matrix()
        np.testing.assert_allclose(fn(t).numpy(), ref, atol=1e-15,
                                   err_msg=f"{fn.__name__} != scipy")


def test_euler_zyz_matches_scipy_intrinsic_zyz():
    angles = _random_euler(200, 0)
    ours = euler_zyz_to_matrix(torch.from_numpy(angles)).numpy()
    ref = Rotation.from_euler("ZYZ", angles, degrees=False).as_matrix()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-14,
                               err_msg="euler_zyz_to_matrix != scipy from_euler('ZYZ')")
    # Batched leading dimensions are kept.
    assert euler_zyz_to_matrix(torch.from_numpy(angles).reshape(10, 20, 3)).shape == (10, 20, 3, 3)


def test_matrix_to_euler_round_trip_and_matches_scipy():
    mats = _scipy_rotations(500, 1)
    angles = matrix_to_euler_zyz(torch.from_numpy(mats))
    assert angles[:, 1].min() >= 0 and angles[:, 1].max() <= math.pi, "tilt outside [0, pi]"
    assert angles[:, [0, 2]].abs().max() <= math.pi + 1e-12, "rot/psi outside [-pi, pi]"
    back = euler_zyz_to_matrix(angles).numpy()
    np.testing.assert_allclose(back, mats, rtol=0, atol=1e-10,
                               err_msg="euler_zyz_to_matrix(matrix_to_euler_zyz(R)) != R")
    # Away from the gimbal lock the angles themselves are unique and match scipy.
    ref = Rotation.from_matrix(mats).as_euler("ZYZ")
    ok = (ref[:, 1] > 0.05) & (ref[:, 1] < math.pi - 0.05)
    diff = np.angle(np.exp(1j * (angles.numpy()[ok] - ref[ok])))  # wrap to (-pi, pi]
    assert np.abs(diff).max() < 1e-9, "Euler angles differ from scipy's as_euler('ZYZ')"


@pytest.mark.parametrize("tilt", [0.0, 1e-12, 1e-9, 3e-7, 2e-6, 1e-3, math.pi - 1e-3,
                                  math.pi - 2e-6, math.pi - 3e-7, math.pi - 1e-9, math.pi])
def test_matrix_to_euler_near_gimbal_lock(tilt):
    """Round trip near tilt = 0 and pi (float64).

    Inside the lock band (tilt within 1e-7 of 0 or pi, as scipy) psi is folded into rot, which
    makes an error of at most ~2 tilt; outside it the round trip is exact to rounding.
    """
    dist = min(tilt, math.pi - tilt)
    atol = 2 * dist + 5e-8 if dist < 1e-6 else 1e-9
    rng = np.random.default_rng(2)
    for rot, psi in rng.uniform(-np.pi, np.pi, size=(10, 2)):
        mat = Rotation.from_euler("ZYZ", [rot, tilt, psi]).as_matrix()
        angles = matrix_to_euler_zyz(torch.from_numpy(mat))
        assert 0.0 <= float(angles[1]) <= math.pi, "tilt outside [0, pi]"
        assert torch.isfinite(angles).all()
        back = euler_zyz_to_matrix(angles).numpy()
        np.testing.assert_allclose(back, mat, rtol=0, atol=atol,
                                   err_msg=f"round trip failed near gimbal lock, tilt={tilt}")
    if tilt in (0.0, math.pi):
        mat = Rotation.from_euler("ZYZ", [0.4, tilt, -1.1]).as_matrix()
        assert float(matrix_to_euler_zyz(torch.from_numpy(mat))[2]) == 0.0, \
            "psi should be 0 exactly at the gimbal lock"


def _scipy_zyz(mats: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Gimbal lock detected"
        return Rotation.from_matrix(mats).as_euler("ZYZ")


@pytest.mark.parametrize("tilt", [None, 0.0, 1e-12, 5e-8, 1e-7, 1.5e-7, 1e-6, 1e-3,
                                  math.pi - 1e-3, math.pi - 2e-7, math.pi - 5e-8, math.pi])
def test_matrix_to_euler_is_scipys_as_euler_zyz(tilt):
    """Same angles as scipy (to rounding), including its gimbal-lock band and split."""
    rng = np.random.default_rng(7)
    n = 2000
    angles = np.stack([rng.uniform(-np.pi, np.pi, n),
                       np.arccos(rng.uniform(-1, 1, n)) if tilt is None else np.full(n, tilt),
                       rng.uniform(-np.pi, np.pi, n)], -1)
    mats = Rotation.from_euler("ZYZ", angles).as_matrix()
    ours = matrix_to_euler_zyz(torch.from_numpy(mats)).numpy()
    ref = _scipy_zyz(mats)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-15,
                               err_msg=f"matrix_to_euler_zyz != scipy as_euler('ZYZ'), tilt={tilt}")
    np.testing.assert_array_equal(ours[:, 2] == 0, ref[:, 2] == 0,
                                  err_msg="gimbal lock (psi = 0) decided unlike scipy")


def test_matrix_to_euler_range_ends_as_scipy():
    """Angles of exactly +-pi and the lock at tilt = 0 / pi come out as scipy writes them."""
    angles = np.array([[np.pi, 0.5, 0.3], [0.3, 0.5, np.pi], [-np.pi, 1.0, -np.pi],
                       [np.pi, 0.0, 0.0], [0.0, np.pi, 0.0], [0.5, np.pi, 0.2],
                       [np.pi / 2, np.pi / 2, np.pi / 2], [0.0, 0.0, 0.0]])
    mats = Rotation.from_euler("ZYZ", angles).as_matrix()
    np.testing.assert_allclose(matrix_to_euler_zyz(torch.from_numpy(mats)).numpy(), _scipy_zyz(mats),
                               rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- 6D, quaternions


def test_rotation_6d_gram_schmidt():
    six = torch.from_numpy(np.random.default_rng(3).standard_normal((300, 6)))
    r = rotation_6d_to_matrix(six)
    _assert_rotations(r, what="rotation_6d_to_matrix outputs")
    # Independent Gram-Schmidt written here with numpy.
    a1, a2 = six[:, :3].numpy(), six[:, 3:].numpy()
    e1 = a1 / np.linalg.norm(a1, axis=1, keepdims=True)
    b2 = a2 - np.sum(e1 * a2, axis=1, keepdims=True) * e1
    e2 = b2 / np.linalg.norm(b2, axis=1, keepdims=True)
    ref = np.stack([e1, e2, np.cross(e1, e2)], axis=-1)  # columns
    np.testing.assert_allclose(r.numpy(), ref, atol=1e-12, err_msg="6D columns != Gram-Schmidt")
    # Positive rescaling of either vector does not change the rotation.
    scaled = torch.cat([six[:, :3] * 3.7, six[:, 3:] * 0.2], dim=-1)
    torch.testing.assert_close(rotation_6d_to_matrix(scaled), r, rtol=0, atol=1e-12)


def test_rotation_6d_identity_on_rotations():
    mats = torch.from_numpy(_scipy_rotations(100, 4))
    six = matrix_to_rotation_6d(mats)
    assert six.shape == (100, 6)
    torch.testing.assert_close(six[:, :3], mats[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(six[:, 3:], mats[:, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(rotation_6d_to_matrix(six), mats, rtol=0, atol=1e-14,
                               msg="rotation_6d_to_matrix(matrix_to_rotation_6d(R)) != R")


def test_quaternion_to_matrix_matches_scipy():
    q = np.random.default_rng(5).standard_normal((100, 4)) * 2.0  # unnormalised (w, x, y, z)
    ours = quaternion_to_matrix(torch.from_numpy(q)).numpy()
    ref = Rotation.from_quat(np.concatenate([q[:, 1:], q[:, :1]], axis=1)).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-14, err_msg="quaternion_to_matrix != scipy")


# ----------------------------------------------------------------------------- axis-angle


def _axis_angle_cases() -> dict[str, np.ndarray]:
    """Rotation vectors (n, 3): random, tiny, around the 1e-3 series switch, and near pi."""
    rng = np.random.default_rng(11)
    u = rng.standard_normal((4000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return {
        "random": rng.standard_normal((4000, 3)) * 2.0,  # lengths beyond pi too
        "angle in [0, pi]": u * rng.uniform(0, np.pi, (4000, 1)),
        "tiny (1e-9..1e-4)": u * 10.0 ** rng.uniform(-9, -4, (4000, 1)),
        "near 1e-3": u * rng.uniform(0.9e-3, 1.1e-3, (4000, 1)),
        "near pi (pi - 1e-9 .. pi)": u * (np.pi - rng.uniform(0, 1e-9, (4000, 1))),
        "pi - (1e-6 .. 1e-3)": u * (np.pi - 10.0 ** rng.uniform(-6, -3, (4000, 1))),
        "exactly pi": np.concatenate([u * np.pi, np.eye(3) * np.pi, -np.eye(3) * np.pi]),
        "zero": np.zeros((2, 3)),
    }


def test_axis_angle_to_matrix_matches_scipy():
    for name, v in _axis_angle_cases().items():
        ours = axis_angle_to_matrix(torch.from_numpy(v))
        assert ours.dtype == F64 and ours.shape == (len(v), 3, 3)
        np.testing.assert_allclose(ours.numpy(), Rotation.from_rotvec(v).as_matrix(), rtol=0,
                                   atol=1e-14, err_msg=f"axis_angle_to_matrix != scipy ({name})")
        _assert_rotations(ours, atol=1e-14, what=f"axis_angle_to_matrix ({name})")
    # R v is v rotated right-handedly about the axis: a quarter turn about z takes x to y.
    r = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=F64))
    torch.testing.assert_close(r @ torch.tensor([1.0, 0, 0], dtype=F64),
                               torch.tensor([0.0, 1, 0], dtype=F64), rtol=0, atol=1e-16)
    # Exactly the identity at 0, batch shapes and dtype kept.
    assert torch.equal(axis_angle_to_matrix(torch.zeros(3, dtype=F64)), torch.eye(3, dtype=F64))
    v32 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    r32 = axis_angle_to_matrix(v32)
    assert r32.shape == (2, 5, 3, 3) and r32.dtype == torch.float32
    torch.testing.assert_close(r32, axis_angle_to_matrix(v32.double()).float(), rtol=0, atol=1e-6)


def test_axis_angle_to_matrix_gradients():
    # Finite at 0, where dR/dv_i is the cross-product matrix of e_i.
    jac = torch.autograd.functional.jacobian(axis_angle_to_matrix, torch.zeros(3, dtype=F64))
    gens = torch.tensor([[[0, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 0, 0], [-1, 0, 0]],
                         [[0, -1, 0], [1, 0, 0], [0, 0, 0]]], dtype=F64)
    torch.testing.assert_close(jac.permute(2, 0, 1), gens, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    for scale in (2.0, 1e-5):
        v = (scale * torch.randn(6, 3, generator=g, dtype=F64)).requires_grad_()
        assert torch.autograd.gradcheck(axis_angle_to_matrix, (v,))


def test_matrix_to_axis_angle_matches_scipy():
    for name, v in _axis_angle_cases().items():
        mats = Rotation.from_rotvec(v).as_matrix()
        ours = matrix_to_axis_angle(torch.from_numpy(mats))
        assert ours.dtype == F64 and ours.shape == (len(v), 3)
        # Also at an angle of exactly pi, where v and -v are the same rotation: the same
        # arithmetic as scipy's on the same matrix resolves the sign the same way.
        np.testing.assert_allclose(ours.numpy(), Rotation.from_matrix(mats).as_rotvec(), rtol=0,
                                   atol=1e-14, err_msg=f"matrix_to_axis_angle != scipy ({name})")
        assert float(torch.linalg.vector_norm(ours, dim=-1).max()) <= math.pi + 1e-15
    assert torch.equal(matrix_to_axis_angle(torch.eye(3, dtype=F64)), torch.zeros(3, dtype=F64))
    assert matrix_to_axis_angle(torch.eye(3).expand(2, 4, 3, 3)).shape == (2, 4, 3)


def test_axis_angle_round_trips():
    cases = _axis_angle_cases()
    for name, v in cases.items():
        vt = torch.from_numpy(v)
        mats = axis_angle_to_matrix(vt)
        # Matrix -> vector -> matrix, everywhere (also at pi, whatever sign comes back).
        torch.testing.assert_close(axis_angle_to_matrix(matrix_to_axis_angle(mats)), mats,
                                   rtol=0, atol=1e-14, msg=f"R -> v -> R ({name})")
        back = matrix_to_axis_angle(mats)
        angle = np.linalg.norm(v, axis=1)
        inside = angle < np.pi - 1e-12  # the vector itself comes back
        torch.testing.assert_close(back[inside], vt[inside], rtol=0, atol=1e-12,
                                   msg=f"v -> R -> v ({name})")
        at_pi = np.abs(angle - np.pi) <= 1e-12  # up to the sign of the axis
        err = torch.minimum((back[at_pi] - vt[at_pi]).abs().amax(-1),
                            (back[at_pi] + vt[at_pi]).abs().amax(-1))
        assert bool((err <= 1e-12).all()), f"v -> R -> +-v at pi ({name})"
    # Longer vectors come back wrapped into [0, pi]: v - 2 pi v / |v| for |v| in (pi, 2 pi).
    v = torch.from_numpy(cases["random"])
    t = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    sel = ((t > math.pi + 1e-6) & (t < 2 * math.pi - 1e-6)).squeeze(-1)
    assert sel.sum() > 100
    torch.testing.assert_close(matrix_to_axis_angle(axis_angle_to_matrix(v[sel])),
                               (v - 2 * math.pi * v / t)[sel], rtol=0, atol=1e-12)
    m = torch.from_numpy(_scipy_rotations(500, 12))
    torch.testing.assert_close(axis_angle_to_matrix(matrix_to_axis_angle(m)), m, rtol=0,
                               atol=1e-14)


# ----------------------------------------------------------------------------- sampling


def test_random_rotations_are_haar_uniform():
    n = 20000
    r = random_rotations(n, generator=torch.Generator().manual_seed(1234), dtype=F64)
    assert r.shape == (n, 3, 3) and r.dtype == F64
    _assert_rotations(r, atol=1e-12, what="random_rotations")
    # E[R] = 0 under Haar measure; each entry has variance 1/3.
    tol = 5 * math.sqrt(1 / (3 * n))
    assert r.mean(0).abs().max() < tol, f"mean matrix {r.mean(0)} is not ~0"
    # Rotation angle density (1 - cos t) / pi on [0, pi], i.e. CDF (t - sin t) / pi.
    trace = r.diagonal(dim1=-2, dim2=-1).sum(-1).numpy()
    angle = np.arccos(np.clip((trace - 1) / 2, -1, 1))
    p = stats.kstest(angle, lambda t: (t - np.sin(t)) / np.pi).pvalue
    assert p > 1e-3, f"rotation angles do not follow the Haar density (KS p = {p:.2e})"
    # Viewing directions R e_z are uniform on the sphere: z component uniform on [-1, 1].
    p_dir = stats.kstest(r[:, 2, 2].numpy(), stats.uniform(-1, 2).cdf).pvalue
    assert p_dir > 1e-3, f"viewing directions are not uniform (KS p = {p_dir:.2e})"
    # In-plane angle (psi from ZYZ) is uniform on (-pi, pi].
    psi = matrix_to_euler_zyz(r)[:, 2].numpy()
    p_psi = stats.kstest(psi, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue
    assert p_psi > 1e-3, f"in-plane angles are not uniform (KS p = {p_psi:.2e})"


def test_haar_check_detects_non_uniform_sampling():
    """Sanity check of the test above: uniform Euler angles are NOT Haar uniform."""
    angles = torch.from_numpy(_random_euler(20000, 6))
    r = euler_zyz_to_matrix(angles)
    p_dir = stats.kstest(r[:, 2, 2].numpy(), stats.uniform(-1, 2).cdf).pvalue
    assert p_dir < 1e-6


def test_random_rotations_use_the_generator_deterministically():
    state = torch.random.get_rng_state()
    a = random_rotations(50, generator=torch.Generator().manual_seed(7), dtype=F64)
    b = random_rotations(50, generator=torch.Generator().manual_seed(7), dtype=F64)
    c = random_rotations(50, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was consumed"
    assert torch.equal(a, b), "same seed gave different rotations"
    assert not torch.allclose(a, c), "different seeds gave the same rotations"
    g = torch.Generator().manual_seed(7)
    first, second = random_rotations(25, generator=g, dtype=F64), random_rotations(
        25, generator=g, dtype=F64)
    assert not torch.allclose(first, second), "the generator state does not advance"
    f32 = random_rotations(50, generator=torch.Generator().manual_seed(7))
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), a, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- distances


def test_geodesic_distance_matches_scipy():
    m1, m2 = _scipy_rotations(500, 8), _scipy_rotations(500, 9)
    ours = geodesic_distance(torch.from_numpy(m1), torch.from_numpy(m2)).numpy()
    ref = (Rotation.from_matrix(m1).inv() * Rotation.from_matrix(m2)).magnitude()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7,
                               err_msg="geodesic_distance != scipy (R1^-1 R2).magnitude()")
    # Known angles about a fixed axis.
    t = torch.linspace(0.01, math.pi - 0.01, 50, dtype=F64)
    base = torch.from_numpy(m1[:50])
    axis = torch.from_numpy(Rotation.from_rotvec(np.outer(t.numpy(), [0.36, 0.48, 0.8]))
                            .as_matrix())
    torch.testing.assert_close(geodesic_distance(base, base @ axis), t, rtol=0, atol=1e-10)


def test_frobenius_angle_consistency():
    m1 = torch.from_numpy(_scipy_rotations(500, 10))
    m2 = torch.from_numpy(_scipy_rotations(500, 11))
    d = frobenius_distance_sq(m1, m2)
    np.testing.assert_allclose(d.numpy(), ((m1.numpy() - m2.numpy()) ** 2).sum((-2, -1)),
                               rtol=1e-13)
    angle_f = frobenius_sq_to_angle(d)
    angle_g = geodesic_distance(m1, m2)
    torch.testing.assert_close(angle_f, angle_g, rtol=0, atol=1e-7,
                               msg="2 asin(sqrt(d/8)) != geodesic distance")
    # Closed form d = 8 sin^2(t/2) = 4 (1 - cos t).
    t = torch.linspace(0, math.pi, 33, dtype=F64)
    torch.testing.assert_close(frobenius_sq_to_angle(4 * (1 - torch.cos(t))), t, rtol=0,
                               atol=1e-7)


def test_in_plane_180():
    mats = _scipy_rotations(50, 12)
    rz_pi = Rotation.from_euler("z", np.pi).as_matrix()
    out = in_plane_180(torch.from_numpy(mats))
    np.testing.assert_allclose(out.numpy(), mats @ rz_pi, atol=1e-15,
                               err_msg="in_plane_180(R) != R @ Rz(pi)")
    torch.testing.assert_close(in_plane_180(out), torch.from_numpy(mats), rtol=0, atol=0)
    _assert_rotations(out, what="in_plane_180 outputs")


# ----------------------------------------------------------------------------- grid, alignment


@pytest.mark.parametrize("n_target", [500, 2000, 5000])
def test_so3_grid_count_and_covering(n_target):
    grid = so3_grid(n_target, dtype=F64)
    m = grid.shape[0]
    assert abs(m - n_target) <= 0.05 * n_target, f"so3_grid({n_target}) has {m} rotations"
    _assert_rotations(grid, what="so3_grid")
    assert torch.equal(grid, so3_grid(n_target, dtype=F64)), "so3_grid is not deterministic"
    spacing = (8 * math.pi**2 / n_target) ** (1 / 3)
    probes = torch.from_numpy(_scipy_rotations(1000, 13))
    # Nearest grid rotation for each probe: max trace of R_grid^T R_probe.
    trace = torch.einsum("pij,gij->pg", probes, grid)
    nearest = torch.acos(((trace.max(1).values - 1) / 2).clamp(-1, 1))
    assert nearest.max() < spacing, (
        f"covering radius {nearest.max():.3f} rad exceeds the nominal spacing {spacing:.3f}")
    # No (near) duplicates: the grid is spread out.
    sub = grid[:: max(1, m // 1000)]
    gram = torch.einsum("aij,bij->ab", sub, sub)
    gram.fill_diagonal_(-1.0)
    closest = torch.acos(((gram.max(1).values - 1) / 2).clamp(-1, 1))
    assert closest.min() > 0.1 * spacing, "so3_grid contains near-duplicate rotations"


def test_procrustes_recovers_global_rotation():
    rng = np.random.default_rng(14)
    truth = Rotation.random(random_state=15).as_matrix()
    src = _scipy_rotations(300, 16)
    noise = Rotation.from_rotvec(rng.normal(scale=0.1, size=(300, 3))).as_matrix()
    tgt = noise @ truth @ src
    a = procrustes_rotation(torch.from_numpy(src), torch.from_numpy(tgt))
    _assert_rotations(a[None], what="procrustes_rotation")
    err = geodesic_distance(a, torch.from_numpy(truth))
    assert err < 0.02, f"recovered rotation is {err:.4f} rad from the truth"
    # Independent least-squares reference: scipy's Kabsch on the matrix columns.
    ref, _ = Rotation.align_vectors(tgt.transpose(0, 2, 1).reshape(-1, 3),
                                    src.transpose(0, 2, 1).reshape(-1, 3))
    np.testing.assert_allclose(a.numpy(), ref.as_matrix(), atol=1e-9,
                               err_msg="procrustes_rotation != scipy align_vectors")
    # Noise-free: exact.
    exact = procrustes_rotation(torch.from_numpy(src), torch.from_numpy(truth @ src))
    np.testing.assert_allclose(exact.numpy(), truth, atol=1e-12)


def test_procrustes_returns_proper_rotation_for_mirrored_sets():
    truth = Rotation.random(random_state=17).as_matrix()
    src = _scipy_rotations(50, 18)
    mirror = np.diag([1.0, 1.0, -1.0])
    a = procrustes_rotation(torch.from_numpy(src), torch.from_numpy(mirror @ truth @ src))
    assert abs(float(torch.linalg.det(a)) - 1.0) < 1e-12, "procrustes returned an improper matrix"
