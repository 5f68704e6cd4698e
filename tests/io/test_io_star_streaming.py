"""STAR files read and written in chunks: the same table and the same file whatever the chunk
size, the other columns carried over from the source file, and the compact table."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryoai.io import read_star, write_star
from cryoai.io.particles import COLUMN_FIELDS

N = 1000


def _make_star(path: Path, n: int = N, groups: int = 2, seed: int = 0) -> Path:
    """A RELION 3.1 file with ``groups`` optics groups, poses, and columns cryoai does not use
    (numbers, a class number, a micrograph path and a quoted text with blanks)."""
    rng = np.random.default_rng(seed)
    lines = ["# test file", "", "data_optics", "", "loop_"]
    optics_labels = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration",
                     "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                     "rlnImageDimensionality", "rlnMtfFileName"]
    lines += [f"_{label} #{i}" for i, label in enumerate(optics_labels, start=1)]
    for g in range(1, groups + 1):
        lines.append(f"{g} group{g} {300 - 100 * (g - 1)}.000000 2.700000 0.100000 1.234000 32 2 "
                     f"mtf_{g}.star")
    lines += ["", "", "data_particles", "", "loop_"]
    labels = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnOpticsGroup", "rlnDefocusU",
              "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
              "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber", "rlnComment"]
    lines += [f"_{label} #{i}" for i, label in enumerate(labels, start=1)]
    for i in range(n):
        stack = f"Extract/stack_{i // 300:02d}.mrcs"
        lines.append(
            f"{i % 300 + 1:06d}@{stack} MotionCorr/mic_{i // 50:04d}.mrc {rng.uniform(0, 4000):.6f} "
            f"{1 + i % groups} {rng.uniform(8000, 30000):.6f} {rng.uniform(8000, 30000):.6f} "
            f"{rng.uniform(-180, 180):.6f} {rng.uniform(-180, 180):.6f} {rng.uniform(0, 180):.6f} "
            f"{rng.uniform(-180, 180):.6f} {rng.normal(0, 3):.6f} {rng.normal(0, 3):.6f} "
            f"{rng.integers(1, 5)} \"note {i}\"")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def big_star(tmp_path) -> Path:
    return _make_star(tmp_path / "in.star")


def _assert_same_table(a, b):
    assert len(a) == len(b) and a.box_px == b.box_px
    np.testing.assert_array_equal(a.stack_paths, b.stack_paths)
    np.testing.assert_array_equal(a.stack_indices, b.stack_indices)
    for name in COLUMN_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.optics_group, b.optics_group)
    # rotations pass through Euler angles (9 digits): equal to rounding
    np.testing.assert_allclose(a.rotations, b.rotations, rtol=0, atol=3e-7)
    np.testing.assert_array_equal(a.shifts_a, b.shifts_a)


def test_chunked_read_is_the_same_table(big_star):
    whole = read_star(big_star)
    _assert_same_table(read_star(big_star, chunk_rows=7), whole)
    # against an independent reader
    rows = starfile.read(big_star, always_dict=True)["particles"]
    np.testing.assert_allclose(whole.defocus_u_a, rows["rlnDefocusU"], rtol=1e-7)
    np.testing.assert_allclose(whole.voltage_kv, np.where(rows["rlnOpticsGroup"] == 1, 300, 200))
    np.testing.assert_array_equal(whole.stack_indices, np.arange(N) % 300)
    assert len(whole.stack_files) == 4 and all(Path(s).is_absolute() for s in whole.stack_files)
    np.testing.assert_allclose(
        whole.rotations[5], Rotation.from_euler(
            "ZYZ", rows.loc[5, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float),
            degrees=True).as_matrix(), atol=1e-6)


def test_read_without_poses(big_star):
    t = read_star(big_star, read_poses=False)
    assert t.rotations is None and t.shifts_a is None


def test_table_is_compact(tmp_path):
    one_group = read_star(_make_star(tmp_path / "one.star", groups=1), read_poses=False)
    # stack id, image index, micrograph code, defocus U, V, angle: 4 bytes each; constant
    # columns hold one value
    assert one_group.nbytes <= 24 * N + 64, one_group.nbytes
    assert one_group.micrograph_ids is not None
    assert one_group.voltage_kv.strides == (0,) and one_group.optics_group.strides == (0,)
    two_groups = read_star(_make_star(tmp_path / "two.star", groups=2), read_poses=False)
    # + the group and the voltage per particle
    assert two_groups.nbytes <= 32 * N + 64, two_groups.nbytes


def test_written_file_does_not_depend_on_chunks(big_star, tmp_path):
    t = read_star(big_star)
    write_star(tmp_path / "a.star", t)
    write_star(tmp_path / "b.star", t, chunk_rows=13)
    rng = np.random.default_rng(1)
    sizes = np.diff(np.unique(np.concatenate([[0, N], rng.integers(1, N, 40)])))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pose_chunks = [(t.rotations[s:s + k].astype(np.float64), t.shifts_a[s:s + k])
                   for s, k in zip(starts, sizes, strict=True)]
    write_star(tmp_path / "c.star", t.with_poses(None, None), poses=iter(pose_chunks), chunk_rows=64)
    a = (tmp_path / "a.star").read_text()
    assert (tmp_path / "b.star").read_text() == a
    assert (tmp_path / "c.star").read_text() == a
    _assert_same_table(read_star(tmp_path / "a.star"), t)


def test_other_columns_are_carried_over(big_star, tmp_path):
    t = read_star(big_star)
    out = tmp_path / "out" / "poses.star"
    out.parent.mkdir()
    write_star(out, t, chunk_rows=100)
    blocks = starfile.read(out, always_dict=True)
    original = starfile.read(big_star, always_dict=True)
    rows, src = blocks["particles"], original["particles"]
    for col in ("rlnMicrographName", "rlnCoordinateX", "rlnClassNumber", "rlnOpticsGroup"):
        np.testing.assert_array_equal(rows[col].to_numpy(), src[col].to_numpy(), err_msg=col)
    assert rows["rlnComment"].iloc[7] == "note 7"  # quoted text with a blank stays one value
    assert list(blocks["optics"]["rlnMtfFileName"]) == ["mtf_1.star", "mtf_2.star"]
    number, stack = rows["rlnImageName"].iloc[301].split("@")
    # the name as read (the stacks of this file do not exist: nothing to check it against)
    assert number == "000002" and stack == "Extract/stack_01.mrcs"


def test_shuffled_subset_carries_the_right_rows(big_star, tmp_path):
    t = read_star(big_star)
    order = np.random.default_rng(2).permutation(N)[:100]
    sub = t.subset(order)
    write_star(tmp_path / "sub.star", sub, chunk_rows=16)
    rows = starfile.read(tmp_path / "sub.star", always_dict=True)["particles"]
    src = starfile.read(big_star, always_dict=True)["particles"]
    np.testing.assert_array_equal(rows["rlnCoordinateX"].to_numpy(),
                                  src["rlnCoordinateX"].to_numpy()[order])
    _assert_same_table(read_star(tmp_path / "sub.star"), sub)


def test_changed_source_writes_cryoai_columns_only(big_star, tmp_path):
    t = read_star(big_star)
    big_star.write_text(big_star.read_text().replace("note", "changed"))
    with pytest.warns(UserWarning, match="cannot carry its other columns over"):
        write_star(tmp_path / "out.star", t)
    rows = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert "rlnComment" not in rows.columns and "rlnMicrographName" not in rows.columns
    _assert_same_table(read_star(tmp_path / "out.star"), t)


def test_wrong_number_of_poses_leaves_no_file(big_star, tmp_path):
    t = read_star(big_star)
    out = tmp_path / "out.star"
    short = [(t.rotations[:500], t.shifts_a[:500])]
    with pytest.raises(ValueError, match="fewer rows"):
        write_star(out, t, poses=iter(short))
    long = [(t.rotations, t.shifts_a), (t.rotations[:1], t.shifts_a[:1])]
    with pytest.raises(ValueError, match="more rows"):
        write_star(out, t, poses=iter(long))
    assert not out.exists() and list(tmp_path.iterdir()) == [big_star]


def test_scan_sees_blocks_without_reading_rows(big_star):
    from cryoai.io.star import scan_star

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks = scan_star(big_star)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["particles"].n_rows == N and blocks["optics"].n_rows == 2
    assert blocks["particles"].labels[0] == "rlnImageName"
