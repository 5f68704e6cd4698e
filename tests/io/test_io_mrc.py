"""MRC volumes and stacks: round trips, memory mapping, and one-line errors on bad files."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from cryoai.io import (
    StackWriter,
    check_finite,
    open_stack,
    read_header,
    read_stack_images,
    read_volume,
    write_stack,
    write_volume,
)


def test_volume_round_trip_keeps_voxel_size(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(8, 8, 8)).astype(np.float32)
    path = tmp_path / "vol.mrc"
    write_volume(path, vol, 1.75)
    back, apix = read_volume(path)
    assert back.dtype == np.float32 and back.shape == (8, 8, 8)
    np.testing.assert_array_equal(back, vol)
    assert apix == pytest.approx(1.75)
    with mrcfile.open(path) as m:  # a volume for other readers too
        assert m.is_volume() and int(m.header.ispg) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_volume_replaces_atomically(tmp_path):
    path = tmp_path / "vol.mrc"
    write_volume(path, np.zeros((4, 4, 4)), 1.0)
    write_volume(path, np.ones((4, 4, 4)), 2.0)
    vol, apix = read_volume(path)
    assert vol.min() == 1 and apix == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.mrc"]


def test_read_shared_volumes(shared_data):
    vol, apix = read_volume(shared_data / "aspire-70s" / "noise-free" / "ground_truth.mrc")
    assert vol.shape == (64, 64, 64) and apix == pytest.approx(5.0)
    odd, apix0 = read_volume(shared_data / "maps" / "aspire_clean70SRibosome_vol_65p.mrc")
    assert odd.shape == (65, 65, 65) and apix0 == 0.0  # header leaves it unset


def test_stack_writer_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(10, 12, 12)).astype(np.float32)
    path = tmp_path / "out.mrcs"
    with StackWriter(path, 10, 12, 3.5) as w:
        for start in (6, 0, 3):  # any order
            stop = {0: 3, 3: 6, 6: 10}[start]
            w.write(start, images[start:stop])
        assert not path.exists()  # moved into place on close only
    np.testing.assert_array_equal(read_stack_images(path), images)
    with mrcfile.open(path) as m:
        assert m.is_image_stack() and m.data.shape == (10, 12, 12)
        assert int(m.header.nz) == 10 and int(m.header.ispg) == 0
        assert float(m.voxel_size.x) == pytest.approx(3.5)
        assert float(m.header.dmax) == pytest.approx(images.max())
        assert float(m.header.dmean) == pytest.approx(images.mean(), abs=1e-6)
    assert read_header(path).voxel_size_a[0] == pytest.approx(3.5)


def test_stack_writer_incomplete_or_failing_leaves_nothing(tmp_path):
    path = tmp_path / "out.mrcs"
    w = StackWriter(path, 4, 8, 1.0)
    w.write(0, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="never written"):
        w.close()
    with pytest.raises(RuntimeError), StackWriter(path, 4, 8, 1.0) as w:
        w.write(0, np.zeros((4, 8, 8)))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="outside"), StackWriter(path, 2, 8, 1.0) as w:
        w.write(1, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="even"):
        StackWriter(path, 2, 7, 1.0)


def test_open_stack_is_read_only_memmap(tmp_path):
    images = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 1.0)
    stack = open_stack(path)
    assert isinstance(stack, np.memmap) and stack.shape == (3, 4, 4)
    with pytest.raises(ValueError):
        stack[0, 0, 0] = 1.0
    got = read_stack_images(path, [2, 0, 2])
    np.testing.assert_array_equal(got, images[[2, 0, 2]])


def test_stack_without_map_id_is_read(particles_dir):
    # cryoDRGN's RELION-extracted stack has no 'MAP ' identifier; its header is consistent.
    path = particles_dir / "cryodrgn_relion31_5" / "relion31.mrcs"
    assert open_stack(path).shape == (5, 256, 256)


def test_missing_file(tmp_path, expect_input_error):
    path = tmp_path / "nope.mrc"
    with expect_input_error(path, "not found"):
        read_volume(path)


def test_not_an_mrc_file(tmp_path, expect_input_error):
    path = tmp_path / "notes.mrc"
    path.write_text("hello world\n" * 200)
    with expect_input_error(path, "not an MRC file"):
        open_stack(path)
    short = tmp_path / "short.mrcs"
    short.write_bytes(b"abc")
    with expect_input_error(short, "not an MRC file"):
        read_stack_images(short, [0])


def test_truncated_file(tmp_path, expect_input_error):
    path = tmp_path / "cut.mrcs"
    write_stack(path, np.ones((4, 8, 8), np.float32), 1.0)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with expect_input_error(path, "truncated"):
        open_stack(path)
    with expect_input_error(path, "truncated"):
        read_volume(path)


def test_complex_mode_refused(tmp_path, expect_input_error):
    path = tmp_path / "complex.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((4, 4, 4), np.complex64))
    with expect_input_error(path, "unsupported MRC mode 4"):
        read_volume(path)


def test_odd_box_refused_for_stacks(tmp_path, write_mrcs, expect_input_error):
    path = write_mrcs(tmp_path / "odd.mrcs", np.zeros((2, 65, 65), np.float32))
    with expect_input_error(path, "box size 65 is odd; cryoai needs even boxes"):
        open_stack(path)
    rect = write_mrcs(tmp_path / "rect.mrcs", np.zeros((2, 8, 10), np.float32))
    with expect_input_error(rect, "square"):
        open_stack(rect)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixels(tmp_path, write_mrcs, expect_input_error):
    data = np.zeros((3, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    path = write_mrcs(tmp_path / "nan.mrcs", data)
    read_stack_images(path, [0, 2])  # only the images read are checked
    with expect_input_error(path, "NaN", "image 2,"):
        read_stack_images(path, [0, 1])
    with expect_input_error(path, "NaN"):
        check_finite(np.full((1, 2, 2), np.inf, np.float32), path)


def test_index_past_end(tmp_path, expect_input_error):
    path = tmp_path / "s.mrcs"
    write_stack(path, np.zeros((3, 4, 4)), 1.0)
    with expect_input_error(path, "out of range", "3 images"):
        read_stack_images(path, [0, 3])


def test_no_temp_files_left(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((1, 4, 4)), 1.0)
    assert os.listdir(tmp_path) == ["a.mrcs"]
