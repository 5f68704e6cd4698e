"""What RELION and cryoSPARC read in cryoai's particle files: stack names as the projects mean
them (looked up from the current folder, the project folder, first; written as they were read),
``# version 30001`` before each STAR block, the half sets (``rlnRandomSubset``,
``alignments3D/split``), ``blob/sign`` and ``ctf/exp_group_id``; read back with ``starfile``
and cryoSPARC's ``cryosparc-tools``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoai.errors import InputError
from cryoai.io import IMAGE_PATHS, load_particles, read_cs, read_star, validate_images, write_cs, write_star
from cryoai.io.star import read_star_columns


def _cs_dataset(path: Path):
    from cryosparc.dataset import Dataset

    return Dataset.load(str(path))


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


@pytest.fixture
def project(small_dataset, tmp_path) -> Path:
    """A RELION-like project: ``Extract/job012/stack.mrcs`` and ``Select/job020/particles.star``
    naming it ``NNNNNN@Extract/job012/stack.mrcs`` (relative to the project folder)."""
    star, stack = small_dataset()
    root = tmp_path / "project"
    (root / "Extract" / "job012").mkdir(parents=True)
    (root / "Select" / "job020").mkdir(parents=True)
    shutil.move(stack, root / "Extract" / "job012" / "stack.mrcs")
    text = star.read_text().replace("@stack.mrcs", "@Extract/job012/stack.mrcs")
    (root / "Select" / "job020" / "particles.star").write_text(text)
    star.unlink()
    return root


# ------------------------------------------------------------------------------ stack lookup


def test_relative_names_are_looked_up_from_the_current_folder_first(project, tmp_path, monkeypatch,
                                                                     write_mrcs):
    star = project / "Select" / "job020" / "particles.star"
    stack = project / "Extract" / "job012" / "stack.mrcs"
    monkeypatch.chdir(project)
    t = read_star("Select/job020/particles.star")
    assert t.stack_files == (str(stack),)
    assert t.stack_names == {str(stack): "Extract/job012/stack.mrcs"}  # the name as written
    validate_images(t)
    # Elsewhere, the STAR file's folder is next, then --datadir.
    monkeypatch.chdir(tmp_path)
    beside = star.parent / "Extract" / "job012" / "stack.mrcs"
    beside.parent.mkdir(parents=True)
    write_mrcs(beside, np.zeros((4, 16, 16), np.float32))
    assert read_star(star).stack_files == (str(beside),)
    shutil.rmtree(star.parent / "Extract")
    assert load_particles(star, datadir=project).stack_files == (str(stack),)


def test_cs_names_are_looked_up_from_the_current_folder_first(project, tmp_path, monkeypatch):
    """A .cs deeper than ``project/Jnn/`` (cryoSPARC's exports) with project-relative paths."""
    monkeypatch.chdir(project)
    t = read_star("Select/job020/particles.star")
    write_cs(tmp_path / "all.cs", t, image_paths="absolute")
    records = np.load(tmp_path / "all.cs")
    exported = project / "exports" / "jobs" / "P1_J20_select" / "J20_particles_selected.cs"
    exported.parent.mkdir(parents=True)
    paths = np.array([b"Extract/job012/stack.mrcs"] * len(records))
    out = np.empty(len(records), dtype=[(n, paths.dtype if n == "blob/path" else records.dtype[n])
                                        for n in records.dtype.names])
    for n in records.dtype.names:
        out[n] = paths if n == "blob/path" else records[n]
    with open(exported, "wb") as f:
        np.save(f, out)
    back = read_cs(exported)
    assert back.stack_files == (str(project / "Extract" / "job012" / "stack.mrcs"),)
    validate_images(back)
    monkeypatch.chdir(tmp_path)  # away from the project: not found without --datadir
    with pytest.raises(InputError, match="image stack not found"):
        validate_images(read_cs(exported))
    validate_images(load_particles(exported, datadir=project))


# ---------------------------------------------------------------------------- stack names out


@pytest.mark.parametrize("suffix", [".star", ".cs"])
def test_written_names_as_read_relative_or_absolute(project, monkeypatch, suffix):
    monkeypatch.chdir(project)
    t = read_star("Select/job020/particles.star")
    stack = project / "Extract" / "job012" / "stack.mrcs"
    out_dir = Path("External") / "job031"
    out_dir.mkdir(parents=True)
    expected = {"as_read": "Extract/job012/stack.mrcs", "relative": "../../Extract/job012/stack.mrcs",
                "absolute": str(stack)}
    assert set(expected) == set(IMAGE_PATHS)
    for mode, name in expected.items():
        out = out_dir / f"{mode}{suffix}"
        if suffix == ".star":
            write_star(out, t, image_paths=mode)
            names = list(starfile.read(out, always_dict=True)["particles"]["rlnImageName"])
            assert names == [f"{i:06d}@{name}" for i in range(1, 5)], mode
        else:
            write_cs(out, t, image_paths=mode)
            assert _text(_cs_dataset(out)["blob/path"]) == [name] * 4, mode
        back = load_particles(out)  # read back from the same folder: the same stack
        assert back.stack_files == (str(stack),), mode
        validate_images(back)
    with pytest.raises(ValueError, match="image_paths"):
        write_star(out_dir / "bad.star", t, image_paths="project")
    with pytest.raises(ValueError, match="image_paths"):
        write_cs(out_dir / "bad.cs", t, image_paths="project")
    assert not list(out_dir.glob("bad*")) and not list(out_dir.glob(".*.tmp"))


def test_a_name_as_read_that_would_lead_elsewhere_is_not_kept(small_dataset, tmp_path, monkeypatch,
                                                              write_mrcs):
    """A STAR beside its stack (``@stack.mrcs``), read from elsewhere, written from a folder
    that holds another ``stack.mrcs``: the output names the right stack from there."""
    star, stack = small_dataset()
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    monkeypatch.chdir(work)
    t = read_star(star)
    assert t.stack_files == (str(stack),)
    write_mrcs(work / "stack.mrcs", np.ones((4, 16, 16), np.float32))  # another stack.mrcs here
    for out in (work / "out" / "poses.star", work / "out" / "poses.cs"):
        (write_star if out.suffix == ".star" else write_cs)(out, t)
        assert load_particles(out).stack_files == (str(stack),), out
    names = starfile.read(work / "out" / "poses.star", always_dict=True)["particles"]["rlnImageName"]
    assert names[0] == f"000001@{Path('..') / '..' / 'stack.mrcs'}"


# ------------------------------------------------------------------------------- STAR fields


def test_star_has_a_version_line_before_each_block(small_dataset, tmp_path):
    star, _ = small_dataset()
    out = tmp_path / "out.star"
    write_star(out, read_star(star))
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    blocks = [i for i, line in enumerate(lines) if line.startswith("data_")]
    assert [lines[i] for i in blocks] == ["data_optics", "data_particles"]
    assert all(lines[i - 1] == "# version 30001" for i in blocks)
    assert set(starfile.read(out, always_dict=True)) == {"optics", "particles"}


def test_half_sets_as_rln_random_subset(small_dataset, tmp_path):
    star, _ = small_dataset()
    # the source has its own rlnRandomSubset (another program's half sets): replaced
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnRandomSubset"] = [2, 2, 2, 2]
    starfile.write(blocks, star, overwrite=True)
    t = read_star(star)
    out = tmp_path / "out.star"
    write_star(out, t, half_set=np.array([0, 1, 1, 0]))
    rows = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_array_equal(rows["rlnRandomSubset"], [1, 2, 2, 1])
    assert list(rows.columns).count("rlnRandomSubset") == 1
    assert len(read_star(out)) == 4
    # without half sets, the source's column is carried over
    write_star(tmp_path / "carried.star", t)
    rows = starfile.read(tmp_path / "carried.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(rows["rlnRandomSubset"], [2, 2, 2, 2])
    for bad, match in (([0, 1, 2, 0], "0 \\(first half set\\) or 1"), ([0, 1], "4 particles")):
        with pytest.raises(ValueError, match=match):
            write_star(tmp_path / "bad.star", t, half_set=np.array(bad))
    with pytest.raises(ValueError, match="give one"):
        write_star(tmp_path / "bad.star", t, half_set=np.zeros(4, int),
                   extra_columns={"rlnRandomSubset": np.ones(4, int)})
    assert not (tmp_path / "bad.star").exists()


def test_read_star_columns_reads_only_what_is_asked(small_dataset):
    star, _ = small_dataset()
    columns = read_star_columns(star, lambda label: label in ("rlnClassNumber", "rlnDefocusU", "rlnNone"))
    assert list(columns) == ["rlnDefocusU", "rlnClassNumber"]  # the file's order
    np.testing.assert_array_equal(columns["rlnClassNumber"], [1, 1, 1, 1])
    np.testing.assert_allclose(columns["rlnDefocusU"], [10100, 10200, 10300, 10400])
    assert read_star_columns(star, lambda label: label.startswith("rlnCryoai")) == {}


# -------------------------------------------------------------------------------- .cs fields


def test_cs_sign_exposure_groups_and_half_sets_read_by_cryosparc_tools(small_dataset, tmp_path):
    star, _ = small_dataset()
    t = read_star(star)
    out = tmp_path / "poses.cs"
    write_cs(out, t, half_set=np.array([0, 1, 1, 0]))
    ds = _cs_dataset(out)
    np.testing.assert_array_equal(ds["blob/sign"], -1.0)  # RELION's particles: dark protein
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], 1)  # the optics group
    np.testing.assert_array_equal(ds["alignments3D/split"], [0, 1, 1, 0])
    records = np.load(out)
    assert records.dtype["blob/sign"] == np.float32
    assert records.dtype["ctf/exp_group_id"] == np.uint32 == records.dtype["alignments3D/split"]

    # exposure groups follow the optics groups; a sign given is written, and kept through a read
    grouped = dataclasses.replace(t, optics_group=np.array([1, 2, 2, 1]))
    write_cs(tmp_path / "bright.cs", grouped, sign=1)
    ds = _cs_dataset(tmp_path / "bright.cs")
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], [1, 2, 2, 1])
    np.testing.assert_array_equal(ds["blob/sign"], 1.0)
    assert "alignments3D/split" not in ds.fields()
    back = read_cs(tmp_path / "bright.cs")
    np.testing.assert_array_equal(back.image_sign, 1.0)
    np.testing.assert_array_equal(back.optics_group, [1, 2, 2, 1])
    write_cs(tmp_path / "again.cs", back)
    ds = _cs_dataset(tmp_path / "again.cs")
    np.testing.assert_array_equal(ds["blob/sign"], 1.0)
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], [1, 2, 2, 1])

    with pytest.raises(ValueError, match="sign"):
        write_cs(tmp_path / "bad.cs", t, sign=0)
    with pytest.raises(ValueError, match="needs poses"):
        write_cs(tmp_path / "bad.cs", t.with_poses(None, None), half_set=np.zeros(4, int))
    with pytest.raises(ValueError, match="0 \\(first half set\\) or 1"):
        write_cs(tmp_path / "bad.cs", t, half_set=np.array([1, 2, 1, 2]))
    assert not (tmp_path / "bad.cs").exists()
