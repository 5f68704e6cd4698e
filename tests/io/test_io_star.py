"""RELION STAR files: the shared real files, conventions, round trips and bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryoai.io import ImageSource, load_particles, read_star, validate_images, write_star
from cryoai.io.particles import CTF_FIELDS
from cryoai.io.star import euler_deg_to_matrix, matrix_to_euler_deg


def relion_euler_angles2matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` written out (as in RELION's euler.cpp and pyem)."""
    a, b, g = np.deg2rad([rot_deg, tilt_deg, psi_deg])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


# ------------------------------------------------------------------------ conventions


def test_euler_convention_matches_relion_and_physics():
    rng = np.random.default_rng(3)
    angles = np.column_stack([rng.uniform(-180, 180, 20), rng.uniform(0, 180, 20),
                              rng.uniform(-180, 180, 20)])
    r = euler_deg_to_matrix(angles)
    for k in range(len(angles)):
        # RELION's own matrix is the transpose of cryoai's pose (CONVENTIONS.md)
        np.testing.assert_allclose(r[k], relion_euler_angles2matrix(*angles[k]).T, atol=1e-12)
    torch = pytest.importorskip("torch")
    from cryoai.physics.rotations import euler_zyz_to_matrix

    r_torch = euler_zyz_to_matrix(torch.from_numpy(np.deg2rad(angles))).numpy()
    np.testing.assert_allclose(r, r_torch, atol=1e-12)


def test_matrix_to_euler_round_trip_including_gimbal_lock():
    rng = np.random.default_rng(4)
    angles = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50),
                              rng.uniform(-180, 180, 50)])
    angles[:3, 1] = [0.0, 180.0, 1e-9]
    r = euler_deg_to_matrix(angles)
    np.testing.assert_allclose(euler_deg_to_matrix(matrix_to_euler_deg(r)), r, atol=1e-9)


@pytest.mark.parametrize("tilt_deg", [None, 0.0, 1e-5, 1e-4, 179.9999, 180.0])
def test_angles_written_are_scipys(tilt_deg):
    """The text written for float32 poses (the table's) is that of scipy's
    ``Rotation.from_matrix(R).as_euler("ZYZ", degrees=True)``, and reading it back gives the
    same matrices as scipy's ``from_euler``, near the gimbal lock too."""
    import warnings

    rng = np.random.default_rng(8)
    n = 3000
    angles = np.column_stack([rng.uniform(-180, 180, n),
                              np.rad2deg(np.arccos(rng.uniform(-1, 1, n))) if tilt_deg is None
                              else np.full(n, tilt_deg), rng.uniform(-180, 180, n)])
    poses = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Gimbal lock detected"
        ref = Rotation.from_matrix(poses.astype(np.float64)).as_euler("ZYZ", degrees=True)
    ours = matrix_to_euler_deg(poses)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    text = np.char.mod("%.9g", ours)
    np.testing.assert_array_equal(text, np.char.mod("%.9g", ref))
    back = text.astype(np.float64)
    np.testing.assert_allclose(euler_deg_to_matrix(back),
                               Rotation.from_euler("ZYZ", back, degrees=True).as_matrix(),
                               rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="determinant"):
        matrix_to_euler_deg(-poses[:2])


# ------------------------------------------------------------------------ shared files


def test_every_shared_particle_file_loads(shared_data):
    files = sorted(shared_data.glob("**/*.star")) + sorted(shared_data.glob("**/*.cs"))
    assert len(files) >= 7
    for f in files:
        table = load_particles(f)
        assert len(table) > 0 and table.box_px % 2 == 0
        for name in CTF_FIELDS:
            assert getattr(table, name).shape == (len(table),), (f, name)
        assert np.all(table.pixel_size_a > 0)


def test_aspire_sample_30_and_31_agree(particles_dir):
    d = particles_dir / "aspire_sample_17"
    t30 = load_particles(d / "sample_particles_relion30.star")
    t31 = load_particles(d / "sample_particles_relion31.star")
    assert len(t30) == len(t31) == 17 and t30.box_px == t31.box_px == 200
    for name in CTF_FIELDS:
        np.testing.assert_allclose(getattr(t30, name), getattr(t31, name), err_msg=name)
    # two optics groups: particles 1-8 at 300 kV, 9-17 at 200 kV
    np.testing.assert_array_equal(t31.voltage_kv, [300.0] * 8 + [200.0] * 9)
    assert len(t31.optics) == 2
    np.testing.assert_allclose(t30.defocus_angle_rad, np.deg2rad(7.476096))
    # Row 15 of ASPIRE's 3.1 file is a copy of row 14 (its 3.0 file has a different row 15).
    same = np.arange(17) != 14
    np.testing.assert_allclose(t30.rotations[same], t31.rotations[same], atol=1e-12)
    np.testing.assert_array_equal(t30.stack_indices, t31.stack_indices)
    np.testing.assert_array_equal(t30.stack_paths, t31.stack_paths)
    # Pixel sizes as the files define them: the 3.1 file says rlnImagePixelSize 1.4; the 3.0
    # file has rlnDetectorPixelSize 5 um at rlnMagnification 37369.2 = 1.338 A (ASPIRE's test
    # files are not mutually consistent there, nor in the origins: 3.0 rlnOriginX in pixels,
    # 3.1 rlnOriginXAngst with the same numbers).
    np.testing.assert_allclose(t31.pixel_size_a, 1.4)
    np.testing.assert_allclose(t30.pixel_size_a, 5.0e4 / 37369.207031)
    np.testing.assert_allclose(t30.shifts_a[same] / t30.pixel_size_a[0], t31.shifts_a[same],
                               atol=1e-9)
    np.testing.assert_allclose(t31.shifts_a[0], [-0.1996, -0.1996])


def test_relion31_metadata(particles_dir, tmp_path):
    t = load_particles(particles_dir / "cryodrgn_relion31_5" / "relion31.star")
    assert len(t) == 5 and t.box_px == 256
    np.testing.assert_allclose(t.pixel_size_a, 2.806)
    np.testing.assert_allclose(t.cs_mm, 0.01)
    np.testing.assert_allclose(t.voltage_kv, 300.0)
    np.testing.assert_allclose(t.amplitude_contrast, 0.1)
    np.testing.assert_allclose(t.defocus_u_a[0], 13108.082418)
    np.testing.assert_allclose(t.defocus_angle_rad, np.deg2rad(-160.39))
    assert t.has_poses and t.has_shifts
    np.testing.assert_allclose(
        t.rotations[0],
        Rotation.from_euler("ZYZ", [-102.30296, 82.318041, 124.706463], degrees=True).as_matrix(),
    )
    np.testing.assert_allclose(t.shifts_a[0], [-0.019324, 0.64686])
    np.testing.assert_array_equal(t.stack_indices, np.arange(5))
    write_star(tmp_path / "out.star", t)  # the other columns are carried over on export
    rows = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert "rlnImageOriginalName" in rows.columns
    images = ImageSource(t).read([4, 0])
    assert images.shape == (2, 256, 256) and images.dtype == np.float32


def test_empiar10076_star_30(particles_dir):
    t = load_particles(particles_dir / "cryodrgn_empiar10076_7" / "empiar_10076_7.star")
    assert len(t) == 7 and t.box_px == 320  # box from the stack header (no rlnImageSize)
    np.testing.assert_allclose(t.pixel_size_a, 5 * 1e4 / 38168)
    assert not t.has_poses and t.shifts_a is None
    images = ImageSource(t).read(np.arange(7))
    assert images.shape == (7, 320, 320)


def test_aspire_70s_noise_free(shared_data, tmp_path):
    d = shared_data / "aspire-70s" / "noise-free"
    t = load_particles(d / "particles.star")
    assert len(t) == 1000 and t.box_px == 64 and t.has_poses
    np.testing.assert_allclose(t.pixel_size_a, 5.0)
    # ASPIRE's own arrays: its rotations are cryoai's poses, its offsets are RELION's origin.
    np.testing.assert_allclose(t.rotations, np.load(d / "gt_rotations.npy"), atol=1e-6)
    np.testing.assert_allclose(t.shifts_a, -5.0 * np.load(d / "gt_offsets_px.npy"), atol=1e-5)
    write_star(tmp_path / "out.star", t)
    rows = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    original = starfile.read(d / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(rows["aspireAmplitude"], original["aspireAmplitude"], rtol=1e-7)
    assert ImageSource(t).read([999, 0]).shape == (2, 64, 64)


# ------------------------------------------------------------------------ round trips


def assert_tables_match(a, b, *, poses_atol=1e-6):
    assert len(a) == len(b) and a.box_px == b.box_px
    for name in (*CTF_FIELDS, "pixel_size_a"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-8, atol=1e-9,
                                   err_msg=name)
    np.testing.assert_array_equal(a.stack_indices, b.stack_indices)
    np.testing.assert_array_equal(a.stack_paths, b.stack_paths)
    assert a.has_poses == b.has_poses and a.has_shifts == b.has_shifts
    if a.has_poses:
        np.testing.assert_allclose(a.rotations, b.rotations, atol=poses_atol)
    if a.has_shifts:
        np.testing.assert_allclose(a.shifts_a, b.shifts_a, atol=1e-8)


def test_star31_round_trip(particles_dir, tmp_path):
    src = particles_dir / "aspire_sample_17" / "sample_particles_relion31.star"
    t = read_star(src)
    out = tmp_path / "sub" / "out.star"
    out.parent.mkdir()
    write_star(out, t)
    back = read_star(out)
    assert_tables_match(t, back)
    written = starfile.read(out, always_dict=True)["particles"]
    original = starfile.read(src, always_dict=True)["particles"]
    for col in ("rlnCoordinateX", "rlnClassNumber", "rlnMicrographName", "rlnRandomSubset",
                "rlnLogLikeliContribution", "rlnCtfScalefactor", "rlnOpticsGroup"):
        np.testing.assert_array_equal(written[col].to_numpy(), original[col].to_numpy(), err_msg=col)
    assert list(back.optics["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2"]
    assert "rlnMtfFileName" in back.optics.columns  # original optics table kept
    names = starfile.read(out, always_dict=True)["particles"]["rlnImageName"]
    number, stack = names[0].split("@")
    assert number == "000001" and not Path(stack).is_absolute()  # relative to the output
    assert (out.parent / stack).resolve() == (src.parent / "sample.mrcs").resolve()


def test_star30_to_31_round_trip(particles_dir, tmp_path):
    src = particles_dir / "aspire_sample_17" / "sample_particles_relion30.star"
    t = read_star(src)
    original = starfile.read(src, always_dict=True)
    original = original.get("particles", next(iter(original.values())))
    out = tmp_path / "out.star"
    write_star(out, t)
    back = read_star(out)
    assert_tables_match(t, back)
    blocks = starfile.read(out, always_dict=True)
    optics, rows = blocks["optics"], blocks["particles"]
    assert sorted(optics["rlnVoltage"]) == [200.0, 300.0]
    assert set(optics["rlnImageSize"]) == {200}
    for gone in ("rlnOriginX", "rlnOriginY", "rlnVoltage", "rlnMagnification",
                 "rlnDetectorPixelSize"):
        assert gone not in rows.columns
    np.testing.assert_allclose(rows["rlnOriginXAngst"], original["rlnOriginX"] * 5e4 / 37369.207031,
                               rtol=1e-6)
    np.testing.assert_array_equal(rows["rlnAutopickFigureOfMerit"],
                                  original["rlnAutopickFigureOfMerit"])


def test_relion31_and_new_poses_round_trip(particles_dir, tmp_path):
    t = read_star(particles_dir / "cryodrgn_relion31_5" / "relion31.star")
    rng = np.random.default_rng(5)
    rots = Rotation.random(5, random_state=6).as_matrix()
    rots[0] = Rotation.from_euler("ZYZ", [30, 0, 0], degrees=True).as_matrix()  # gimbal lock
    rots[1] = Rotation.from_euler("ZYZ", [30, 180, 10], degrees=True).as_matrix()
    t2 = t.with_poses(rots, rng.normal(size=(5, 2)))
    out = tmp_path / "poses.star"
    write_star(out, t2)
    back = read_star(out)
    assert_tables_match(t2, back)
    assert back.optics["rlnImageSize"].tolist() == [256]
    # removing the poses removes the stale columns
    write_star(out, replace(t, rotations=None, shifts_a=None))
    rows = starfile.read(out, always_dict=True)["particles"]
    assert "rlnAngleRot" not in rows.columns and "rlnOriginXAngst" not in rows.columns
    assert read_star(out).rotations is None


def test_modified_ctf_rebuilds_optics(particles_dir, tmp_path):
    t = read_star(particles_dir / "cryodrgn_relion31_5" / "relion31.star")
    t2 = replace(t, voltage_kv=np.array([300.0, 300.0, 200.0, 200.0, 300.0]))
    out = tmp_path / "o.star"
    write_star(out, t2)
    back = read_star(out)
    np.testing.assert_allclose(back.voltage_kv, t2.voltage_kv)
    assert len(back.optics) == 2


def test_subset_and_write(shared_data, tmp_path):
    t = read_star(shared_data / "aspire-70s" / "noise-free" / "particles.star")
    sub = t.subset(np.arange(0, 1000, 100))
    out = tmp_path / "sub.star"
    write_star(out, sub)
    back = read_star(out)
    assert_tables_match(sub, back)
    np.testing.assert_array_equal(ImageSource(back).read([3]), ImageSource(t).read([300]))


# ------------------------------------------------------------------------ bad input


def test_small_dataset_valid(small_dataset):
    star, _ = small_dataset()
    t = read_star(star)
    validate_images(t)
    assert len(t) == 4 and t.box_px == 16
    np.testing.assert_allclose(t.shifts_a[1], [-1.0, 0.5])  # = -(rlnOriginXAngst, YAngst)


def test_not_a_star_file(tmp_path, expect_input_error):
    path = tmp_path / "junk.star"
    path.write_text("this is not\na STAR file\n")
    with expect_input_error(path, "not a STAR file"):
        read_star(path)


def test_optics_without_particles(tmp_path, expect_input_error):
    path = tmp_path / "optics_only.star"
    path.write_text("data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n2 200\n")
    with expect_input_error(path, "no data_particles"):
        read_star(path)


def test_missing_image_name(tmp_path, expect_input_error):
    path = tmp_path / "no_names.star"
    path.write_text("data_\n\nloop_\n_rlnDefocusU\n_rlnDefocusV\n1000 1000\n2000 2000\n")
    with expect_input_error(path, "no rlnImageName"):
        read_star(path)


def test_missing_defocus(small_dataset, expect_input_error):
    star, _ = small_dataset()
    text = star.read_text().replace("_rlnDefocusU\n", "_rlnSomethingElse\n")
    star.write_text(text)
    with expect_input_error(star, "missing CTF columns rlnDefocusU"):
        read_star(star)


def test_missing_voltage_named(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace("_rlnVoltage\n", "_rlnOther\n"))
    with expect_input_error(star, "rlnVoltage"):
        read_star(star)


def test_no_pixel_size(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace("_rlnImagePixelSize\n", "_rlnOther\n"))
    with expect_input_error(star, "no pixel size"):
        read_star(star)


def test_non_positive_pixel_size(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace(" 2.5 16 2", " 0.0 16 2"))
    with expect_input_error(star, "pixel size must be positive"):
        read_star(star)


def test_mixed_box_sizes(tmp_path, expect_input_error):
    path = tmp_path / "mixed.star"
    path.write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n"
        "1 300 2.7 0.1 1.0 64\n2 300 2.7 0.1 1.0 128\n\n"
        "data_particles\n\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnDefocusU\n_rlnDefocusV\n"
        "_rlnDefocusAngle\n1@a.mrcs 1 1000 1000 0\n1@b.mrcs 2 1000 1000 0\n"
    )
    with expect_input_error(path, "mixed box sizes 64, 128"):
        read_star(path)


def test_odd_box_in_metadata(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace(" 2.5 16 2", " 2.5 15 2"))
    with expect_input_error(star, "box size 15 is odd"):
        read_star(star)


def test_unknown_optics_group(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace("@stack.mrcs 1 ", "@stack.mrcs 3 "))
    with expect_input_error(star, "optics group 3"):
        read_star(star)


def test_bad_image_name(small_dataset, expect_input_error):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace("000002@stack.mrcs", "abc@stack.mrcs"))
    with expect_input_error(star, "bad rlnImageName 'abc@stack.mrcs'"):
        read_star(star)


def test_reference_past_end_of_stack(small_dataset, expect_input_error):
    star, stack = small_dataset(n_images=4, refs=[1, 2, 7])
    t = read_star(star)  # metadata alone are fine
    with expect_input_error(stack, "image 7", "has 4 images"):
        validate_images(t)
    with expect_input_error(stack, "image 7"):
        ImageSource(t).read([2])
    ImageSource(t).read([0, 1])


def test_missing_stack_reported_when_images_are_needed(small_dataset, tmp_path,
                                                       expect_input_error):
    star, stack = small_dataset()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    stack.rename(moved / stack.name)
    t = read_star(star)  # rlnImageSize is in the optics table: no stack needed to load
    with expect_input_error("stack.mrcs", "image stack not found", "particles.star"):
        validate_images(t)
    with expect_input_error("stack.mrcs", "not found"):
        ImageSource(t).read([0])
    # datadir finds it
    t2 = load_particles(star, datadir=moved)
    validate_images(t2)
    assert t2.stack_paths[0] == str(moved / "stack.mrcs")


def test_stack_found_by_basename(small_dataset):
    star, _ = small_dataset()
    star.write_text(star.read_text().replace("@stack.mrcs", "@Extract/job007/stack.mrcs"))
    t = read_star(star)
    assert t.stack_paths[0] == str(star.parent / "stack.mrcs")
    validate_images(t)


def test_unflipped_flags_are_read_and_flipped_ones_refused(tmp_path):
    """rlnCtfDataArePhaseFlipped / rlnCtfDataAreCtfPremultiplied = 0 reads as usual; = 1 is a
    one-line error naming the flag."""
    import pandas as pd

    from cryoai.errors import InputError

    def star(flag_in_optics: int) -> Path:
        path = tmp_path / f"flags{flag_in_optics}.star"
        optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                               "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                               "rlnImagePixelSize": [2.0], "rlnImageSize": [16],
                               "rlnCtfDataArePhaseFlipped": [flag_in_optics]})
        parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@x.mrcs" for i in range(3)],
                              "rlnDefocusU": [1e4] * 3, "rlnDefocusV": [1e4] * 3,
                              "rlnDefocusAngle": [0.0] * 3, "rlnOpticsGroup": [1] * 3})
        starfile.write({"optics": optics, "particles": parts}, path)
        return path

    assert len(read_star(star(0))) == 3
    with pytest.raises(InputError, match="phase-flipped.*rlnCtfDataArePhaseFlipped"):
        read_star(star(1))
