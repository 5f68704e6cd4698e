"""ImageSource: lazy reads in the requested order across stacks, pickling, validation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cryoai.io import ImageSource, read_stack_images, read_star, resolve_stacks


@pytest.fixture
def two_stacks(tmp_path, write_mrcs):
    """A STAR over two stacks (3 and 5 images of 8 px), rows interleaved; (star, a, b)."""
    rng = np.random.default_rng(9)
    a = rng.normal(size=(3, 8, 8)).astype(np.float32)
    b = rng.normal(size=(5, 8, 8)).astype(np.float32)
    write_mrcs(tmp_path / "a.mrcs", a)
    (tmp_path / "sub").mkdir()
    write_mrcs(tmp_path / "sub" / "b.mrcs", b)
    refs = ["2@a.mrcs", "5@sub/b.mrcs", "1@a.mrcs", "1@sub/b.mrcs", "3@a.mrcs", "3@sub/b.mrcs"]
    rows = "\n".join(f"{r} 10000 9000 30 300 2.7 0.1 1.0" for r in refs)
    star = tmp_path / "p.star"
    star.write_text("data_\n\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n"
                    "_rlnDefocusAngle\n_rlnVoltage\n_rlnSphericalAberration\n"
                    "_rlnAmplitudeContrast\n_rlnImagePixelSize\n" + rows + "\n")
    return star, a, b


def test_reads_in_requested_order(two_stacks):
    star, a, b = two_stacks
    src = ImageSource(read_star(star))
    assert src.shape == (6, 8, 8) and len(src.stacks) == 2
    expected = np.stack([a[1], b[4], a[0], b[0], a[2], b[2]])
    np.testing.assert_array_equal(src.read(np.arange(6)), expected)
    order = [5, 0, 0, 3, 2]
    got = src.read(order)
    assert got.dtype == np.float32 and got.shape == (5, 8, 8)
    np.testing.assert_array_equal(got, expected[order])
    np.testing.assert_array_equal(src[-1], expected[5])
    assert src.read([]).shape == (0, 8, 8)
    with pytest.raises(IndexError):
        src.read([6])
    src.validate()


def test_pickle_reopens_lazily(two_stacks):
    star, a, _ = two_stacks
    src = ImageSource(read_star(star))
    src.read([0, 1])
    assert len(src._maps) == 2
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone._maps) == 0
    np.testing.assert_array_equal(clone.read([2]), a[[0]])


def test_lru_closes_old_maps(two_stacks):
    star, a, b = two_stacks
    src = ImageSource(read_star(star), max_open=1)
    for _ in range(2):
        np.testing.assert_array_equal(src.read([0, 1]), np.stack([a[1], b[4]]))
        assert len(src._maps) == 1


def test_resolve_stacks(two_stacks):
    star, _, _ = two_stacks
    stacks = resolve_stacks(read_star(star))
    assert [s.split("/")[-1] for s in stacks] == ["a.mrcs", "b.mrcs"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_read_images(tmp_path, write_mrcs, two_stacks, expect_input_error):
    star, a, _ = two_stacks
    bad = a.copy()
    bad[2, 0, 0] = np.inf
    path = write_mrcs(tmp_path / "a.mrcs", bad)
    src = ImageSource(read_star(star))
    src.read([0, 1])
    with expect_input_error(path, "NaN or infinite", "image 3,"):
        src.read([4])
    assert ImageSource(read_star(star), check_finite=False).read([4]).shape == (1, 8, 8)


def test_box_mismatch_detected(tmp_path, write_mrcs, two_stacks, expect_input_error):
    star, _, _ = two_stacks
    t = read_star(star)  # box 8 from the first stack's header
    path = write_mrcs(tmp_path / "sub" / "b.mrcs", np.zeros((5, 10, 10), np.float32))
    with expect_input_error(path, "10 x 10", "say 8"):
        ImageSource(t).validate()
    with expect_input_error(path, "say 8"):
        ImageSource(t).read([1])


def test_read_stack_images_all(two_stacks):
    star, a, _ = two_stacks
    np.testing.assert_array_equal(read_stack_images(star.parent / "a.mrcs"), a)


def test_random_reads_in_parallel_match_mrcfile(tmp_path, write_mrcs):
    """Many separate runs (the thread-pool path of StackReader) give the images mrcfile reads,
    in the order asked, repeats included; a stack cut short after opening is named, whichever
    thread hits the end."""
    import mrcfile

    from cryoai.errors import InputError
    from cryoai.io import mrc as mrc_module
    from cryoai.io.mrc import StackReader, read_header

    rng = np.random.default_rng(4)
    path = write_mrcs(tmp_path / "s.mrcs", rng.normal(size=(200, 8, 8)).astype(np.float32))
    with mrcfile.open(path, permissive=True) as m:
        reference = np.array(m.data)
    reader = StackReader(read_header(path))
    rows = np.concatenate([rng.permutation(200)[:64], [5, 5, 6, 7, 199]])
    runs = np.flatnonzero(np.diff(np.unique(rows)) != 1).size + 1
    assert runs >= mrc_module._PARALLEL_MIN_RUNS
    np.testing.assert_array_equal(reader.read(rows), reference[rows])
    with open(path, "r+b") as f:  # the last 10 images disappear under the open reader
        f.truncate(path.stat().st_size - 10 * 8 * 8 * 4)
    with pytest.raises(InputError, match="s.mrcs: truncated MRC file"):
        reader.read(rows)
    reader.close()
