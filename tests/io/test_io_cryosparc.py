"""cryoSPARC .cs files: agreement with the same particles' STAR file, pose convention, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoai.io import ImageSource, load_particles, read_cs, read_star, write_star
from cryoai.io.cryosparc import matrix_to_pose, pose_to_matrix
from cryoai.io.particles import CTF_FIELDS


def relion_euler_angles2matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` (pyem ``euler2rot``), written out."""
    a, b, g = np.deg2rad([rot_deg, tilt_deg, psi_deg])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


def pyem_expmap(e: np.ndarray) -> np.ndarray:
    """pyem ``geom.expmap`` (used by csparc2star): the transposed Rodrigues matrix."""
    theta = np.linalg.norm(e)
    w = e / theta
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    return (np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k).T


def cryodrgn_r_from_relion(a, b, y) -> np.ndarray:
    """cryoDRGN ``utils.R_from_relion`` (its pose for RELION angles), written out."""
    a, b, y = np.deg2rad([a, b, y])
    ca, sa, cb, sb, cy, sy = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(y), np.sin(y)
    ra = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rb = np.array([[cb, 0, -sb], [0, 1, 0], [sb, 0, cb]])
    ry = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    r = ry @ rb @ ra
    r[0, 1] *= -1
    r[1, 0] *= -1
    r[1, 2] *= -1
    r[2, 1] *= -1
    return r


def test_pose_convention_matches_pyem_and_cryodrgn():
    rng = np.random.default_rng(7)
    for _ in range(20):
        pose = rng.normal(size=3)
        r = pose_to_matrix(pose[None])[0]
        # pyem csparc2star: RELION angles = rot2euler(expmap(pose)), i.e. RELION's matrix
        # Euler_angles2matrix(angles) == pyem_expmap(pose); cryoai's pose is its transpose.
        np.testing.assert_allclose(r, pyem_expmap(pose).T, atol=1e-12)
        angles = Rotation.from_matrix(r).as_euler("ZYZ", degrees=True)
        np.testing.assert_allclose(relion_euler_angles2matrix(*angles), pyem_expmap(pose),
                                   atol=1e-12)
        # cryoDRGN parse_pose_csparc: its pose is expmap(pose).T (plain Rodrigues, transposed),
        # the same as its R_from_relion(angles) for the RELION angles of the particle.
        rodrigues = Rotation.from_rotvec(pose).as_matrix()
        np.testing.assert_allclose(cryodrgn_r_from_relion(*angles), rodrigues.T, atol=1e-12)
    poses = rng.normal(size=(10, 3))
    np.testing.assert_allclose(pose_to_matrix(matrix_to_pose(pose_to_matrix(poses))),
                               pose_to_matrix(poses), atol=1e-12)


def test_pose_conversions_are_scipys_rotvec():
    # pose_to_matrix / matrix_to_pose are cryoai.physics.rotations' axis-angle functions in
    # float64; scipy's from_rotvec / as_rotvec are the independent reference.
    rng = np.random.default_rng(8)
    u = rng.normal(size=(2000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    poses = np.concatenate([rng.normal(size=(2000, 3)) * 2, u * 10.0 ** rng.uniform(-9, -4, (2000, 1)),
                            u * (np.pi - rng.uniform(0, 1e-9, (2000, 1))), np.zeros((1, 3))])
    r = pose_to_matrix(poses)
    assert r.dtype == np.float64 and r.shape == (len(poses), 3, 3)
    np.testing.assert_allclose(r, Rotation.from_rotvec(poses).as_matrix(), rtol=0, atol=1e-14)
    back = matrix_to_pose(r)
    assert back.dtype == np.float64 and back.shape == (len(poses), 3)
    np.testing.assert_allclose(back, Rotation.from_matrix(r).as_rotvec(), rtol=0, atol=1e-14)
    # float32 poses, a single pose, and a read-only strided field of a structured array.
    p32 = poses[:100].astype(np.float32)
    np.testing.assert_allclose(pose_to_matrix(p32), Rotation.from_rotvec(p32.astype(np.float64))
                               .as_matrix(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(pose_to_matrix(poses[0]), r[:1], rtol=0, atol=0)
    rec = np.zeros(100, dtype=[("x", "u1"), ("alignments3D/pose", "<f8", (3,))])
    rec["alignments3D/pose"] = poses[:100]
    field = rec["alignments3D/pose"]
    field.flags.writeable = False
    np.testing.assert_allclose(pose_to_matrix(field), r[:100], rtol=0, atol=0)


def test_empiar10076_star_and_cs_agree(particles_dir):
    d = particles_dir / "cryodrgn_empiar10076_7"
    cs = load_particles(d / "empiar_10076_7.cs")
    star = load_particles(d / "empiar_10076_7.star")
    assert len(cs) == len(star) == 7 and cs.box_px == star.box_px == 320
    for name, rtol in [("defocus_u_a", 1e-6), ("defocus_v_a", 1e-6), ("defocus_angle_rad", 1e-6),
                       ("voltage_kv", 0), ("cs_mm", 1e-6), ("amplitude_contrast", 1e-6),
                       ("phase_shift_rad", 0), ("bfactor_a2", 0), ("pixel_size_a", 1e-5)]:
        np.testing.assert_allclose(getattr(cs, name), getattr(star, name), rtol=rtol, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_array_equal(cs.stack_indices, star.stack_indices)
    np.testing.assert_array_equal(cs.stack_paths, star.stack_paths)
    assert not cs.has_poses and cs.shifts_a is None
    np.testing.assert_array_equal(ImageSource(cs).read([6, 1]), ImageSource(star).read([6, 1]))


def _cs_with_poses(particles_dir: Path, tmp_path: Path, angles_deg, origin_px) -> Path:
    """The real .cs plus alignments3D fields, poses built the way pyem reads them back."""
    real = np.load(particles_dir / "cryodrgn_empiar10076_7" / "empiar_10076_7.cs")
    fields = [*real.dtype.descr, ("alignments3D/pose", "<f4", (3,)),
              ("alignments3D/shift", "<f4", (2,))]
    out = np.zeros(len(real), dtype=fields)
    for name in real.dtype.names:
        out[name] = real[name]
    # RELION matrix A = Euler_angles2matrix(angles) = pyem_expmap(pose) = from_rotvec(pose).T
    out["alignments3D/pose"] = [Rotation.from_matrix(relion_euler_angles2matrix(*a).T).as_rotvec()
                                for a in angles_deg]
    out["alignments3D/shift"] = origin_px
    path = tmp_path / "with_poses.cs"
    with open(path, "wb") as f:
        np.save(f, out)
    (tmp_path / "empiar_10076_7.mrc").symlink_to(
        particles_dir / "cryodrgn_empiar10076_7" / "empiar_10076_7.mrc")
    return path


def test_cs_poses_match_relion_angles(particles_dir, tmp_path):
    rng = np.random.default_rng(8)
    angles = np.column_stack([rng.uniform(-180, 180, 7), rng.uniform(0, 180, 7),
                              rng.uniform(-180, 180, 7)])
    origin_px = rng.normal(size=(7, 2))
    t = read_cs(_cs_with_poses(particles_dir, tmp_path, angles, origin_px))
    expected = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(t.rotations, expected, atol=1e-6)
    np.testing.assert_allclose(t.shifts_a, -origin_px.astype(np.float32) * t.pixel_size_a[:, None],
                               rtol=1e-6)
    # written as STAR, the angles and origins are RELION's
    out = tmp_path / "from_cs.star"
    write_star(out, t)
    back = read_star(out)
    np.testing.assert_allclose(back.rotations, expected, atol=1e-6)
    np.testing.assert_allclose(back.shifts_a, t.shifts_a, atol=1e-9)
    np.testing.assert_allclose(back.defocus_angle_rad, t.defocus_angle_rad, atol=1e-9)
    np.testing.assert_array_equal(back.stack_paths, t.stack_paths)


def test_cs_without_blob_fields(tmp_path, expect_input_error):
    arr = np.zeros(3, dtype=[("uid", "<u8"), ("ctf/df1_A", "<f4")])
    path = tmp_path / "passthrough.cs"
    with open(path, "wb") as f:
        np.save(f, arr)
    with expect_input_error(path, "no blob/path"):
        read_cs(path)


def test_cs_with_pickled_objects_refused(tmp_path, expect_input_error):
    arr = np.array([{"blob/path": "x"}, None], dtype=object)
    path = tmp_path / "evil.cs"
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    with expect_input_error(path, "pickled"):
        load_particles(path)
    structured = np.zeros(2, dtype=[("blob/path", object), ("blob/idx", "<u4")])
    path2 = tmp_path / "evil2.cs"
    with open(path2, "wb") as f:
        np.save(f, structured, allow_pickle=True)
    with expect_input_error(path2, "pickled"):
        read_cs(path2)


def test_cs_not_numpy(tmp_path, expect_input_error):
    path = tmp_path / "text.cs"
    path.write_text("not numpy\n")
    with expect_input_error(path, "not a cryoSPARC .cs file"):
        read_cs(path)


def test_cs_missing_ctf(particles_dir, tmp_path, expect_input_error):
    real = np.load(particles_dir / "cryodrgn_empiar10076_7" / "empiar_10076_7.cs")
    keep = [n for n in real.dtype.names if n != "ctf/df2_A"]
    path = tmp_path / "no_df2.cs"
    with open(path, "wb") as f:
        np.save(f, real[keep])
    with expect_input_error(path, "missing CTF fields ctf/df2_A"):
        read_cs(path)


def test_load_particles_dispatch_errors(tmp_path, expect_input_error):
    missing = tmp_path / "absent.star"
    with expect_input_error(missing, "not found"):
        load_particles(missing)
    other = tmp_path / "particles.txt"
    other.write_text("x")
    with expect_input_error(other, "unknown particle file type '.txt'"):
        load_particles(other)


@pytest.mark.parametrize("suffix", [".star", ".cs"])
def test_load_particles_dispatch(particles_dir, suffix):
    path = particles_dir / "cryodrgn_empiar10076_7" / f"empiar_10076_7{suffix}"
    assert len(load_particles(path)) == 7


def _synthetic_cs(path: Path, n: int = 300) -> np.ndarray:
    """A particle .cs with the fields cryoSPARC writes (and one cryoai does not use)."""
    rng = np.random.default_rng(11)
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
              ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
              ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    data = np.zeros(n, dtype=fields)
    data["uid"] = rng.integers(0, 2**62, n)
    data["blob/path"] = [f">J1/extract/mic_{i % 3}.mrc".encode() for i in range(n)]
    data["blob/idx"] = np.arange(n) // 3
    data["blob/shape"] = 64
    data["blob/psize_A"] = 1.3
    data["ctf/accel_kv"] = 300
    data["ctf/cs_mm"] = 2.7
    data["ctf/amp_contrast"] = 0.07
    data["ctf/df1_A"] = rng.uniform(1e4, 3e4, n)
    data["ctf/df2_A"] = rng.uniform(1e4, 3e4, n)
    data["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    data["alignments3D/pose"] = rng.normal(size=(n, 3))
    data["alignments3D/shift"] = rng.normal(size=(n, 2))
    with open(path, "wb") as f:
        np.save(f, data)
    return data


def test_cs_read_in_chunks(tmp_path, monkeypatch):
    from cryoai.io import cryosparc

    data = _synthetic_cs(tmp_path / "p.cs")
    whole = read_cs(tmp_path / "p.cs")
    monkeypatch.setattr(cryosparc, "CHUNK_RECORDS", 7)
    chunked = read_cs(tmp_path / "p.cs")
    for t in (whole, chunked):
        assert len(t) == 300 and t.box_px == 64 and len(t.stack_files) == 3
        np.testing.assert_array_equal(t.defocus_u_a, data["ctf/df1_A"])
        np.testing.assert_array_equal(t.stack_indices, data["blob/idx"])
        assert [Path(s).name for s in t.stack_paths[:4]] == ["mic_0.mrc", "mic_1.mrc", "mic_2.mrc",
                                                             "mic_0.mrc"]
        np.testing.assert_allclose(t.rotations, pose_to_matrix(data["alignments3D/pose"]), atol=1e-6)
        np.testing.assert_allclose(t.shifts_a, -1.3 * data["alignments3D/shift"], rtol=1e-6)
        assert t.voltage_kv.strides == (0,)  # one value: held once
    np.testing.assert_array_equal(chunked.stack_ids, whole.stack_ids)
    assert read_cs(tmp_path / "p.cs", read_poses=False).rotations is None


def test_cs_truncated(tmp_path, expect_input_error):
    _synthetic_cs(tmp_path / "p.cs")
    raw = (tmp_path / "p.cs").read_bytes()
    (tmp_path / "cut.cs").write_bytes(raw[: len(raw) - 100])
    with expect_input_error(tmp_path / "cut.cs", "truncated"):
        load_particles(tmp_path / "cut.cs")


@pytest.fixture(scope="module")
def posed_set(tmp_path_factory):
    from cryoai.cli.main import main as cli

    out = tmp_path_factory.mktemp("cs_sim")
    assert cli(["simulate", "--box", "16", "--n", "70", "--outdir", str(out), "--quiet", "--seed", "4",
                "--shift-sigma-a", "8"]) == 0
    return out


def test_write_cs_round_trip_through_cryoai_and_cryosparc_tools(posed_set, tmp_path):
    """poses.cs for cryoSPARC: cryoai reads back the same particles, CTF and poses, and
    cryoSPARC's own toolkit loads the file with the fields it expects."""
    from cryoai.io import write_cs

    table = load_particles(posed_set / "particles.star")
    out = tmp_path / "sub" / "poses.cs"
    out.parent.mkdir()
    write_cs(out, table, chunk_records=16)  # several blocks
    back = read_cs(out)
    assert len(back) == len(table) and back.box_px == table.box_px
    assert [str(Path(s).resolve()) for s in back.stack_files] == \
        [str(Path(s).resolve()) for s in table.stack_files]
    np.testing.assert_array_equal(back.stack_indices, table.stack_indices)
    for name in CTF_FIELDS:
        np.testing.assert_allclose(getattr(back, name), getattr(table, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.rotations, table.rotations, atol=2e-6)
    np.testing.assert_allclose(back.shifts_a, table.shifts_a, atol=1e-4)
    assert np.abs(table.shifts_a).max() > 1.0  # the shifts are not all zero: their sign is tested

    cryosparc_dataset = pytest.importorskip("cryosparc.dataset")
    ds = cryosparc_dataset.Dataset.load(str(out))
    assert len(ds) == len(table)
    for field in ("uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", "ctf/df1_A",
                  "alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A"):
        assert field in ds.fields(), field
    np.testing.assert_allclose(ds["alignments3D/pose"], matrix_to_pose(table.rotations), atol=1e-6)
    np.testing.assert_allclose(ds["alignments3D/shift"],
                               -table.shifts_a / table.pixel_size_a[:, None], atol=1e-5)
    assert len(set(ds["uid"].tolist())) == len(table)


def test_write_cs_takes_streamed_poses_and_refuses_a_wrong_count(posed_set, tmp_path):
    from cryoai.io import write_cs
    from cryoai.physics.rotations import random_rotations

    table = load_particles(posed_set / "particles.star", read_poses=False)
    rot = random_rotations(len(table), generator=torch.Generator().manual_seed(0)).numpy()
    shifts = np.full((len(table), 2), 3.0)
    out = tmp_path / "streamed.cs"
    write_cs(out, table, poses=((rot[i:i + 9], shifts[i:i + 9]) for i in range(0, len(table), 9)))
    back = read_cs(out)
    np.testing.assert_allclose(back.rotations, rot, atol=2e-6)
    np.testing.assert_allclose(back.shifts_a, shifts, atol=1e-4)
    with pytest.raises(ValueError, match="fewer rows"):
        write_cs(tmp_path / "short.cs", table, poses=[(rot[:5], shifts[:5])])
    assert not (tmp_path / "short.cs").exists() and not list(tmp_path.glob(".*.tmp"))
