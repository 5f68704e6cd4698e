"""cryoai at home in a RELION or a cryoSPARC project: run from the project folder, it finds the
stacks by the names those programs write (relative to the project folder), and its outputs keep
those names, so that RELION and cryoSPARC import them from the same folder. The outputs are
read back as the target programs' own readers would: ``starfile`` and cryoSPARC's
``cryosparc-tools``. ``cryoai report`` runs without ``starfile`` (a test-only package).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import yaml

from cryoai.cli.main import main
from cryoai.io import load_particles, validate_images

N, BOX, PER_STACK = 64, 32, 32
#: A run of a few seconds: a short search from a blob, no encoder, no view balancing.
QUICK_TRAIN = ("--pose-encoder", "off", "--search-start", "blob", "--search-iterations", "2",
               "--refine-rounds", "1", "--decoder-epochs", "0.1", "--search-retries", "0",
               "--no-balance-views", "--junk-passes", "0", "--no-tensorboard", "--device", "cpu", "--quiet")
POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """64 particles of 32 px in two stacks of 32 (``particles_000.mrcs``, ``particles_001.mrcs``)."""
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--box", str(BOX), "--n", str(N), "--stack-size", str(PER_STACK),
                 "--snr-db", "0", "--seed", "3", "--device", "cpu", "--quiet", "--outdir", str(out)]) == 0
    return out


def _images(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32).copy()


def _stack_name_and_index(name: str) -> tuple[int, str]:
    number, _, stack = name.partition("@")
    return int(number) - 1, stack


def _check_images_open(names: list[str], expected: dict[str, np.ndarray]) -> None:
    """Each ``NNNNNN@stack`` opens from the current folder and is the image it was."""
    for name in names[:: max(1, len(names) // 8)]:
        index, stack = _stack_name_and_index(name)
        np.testing.assert_array_equal(_images(Path(stack))[index], expected[stack][index])


# ----------------------------------------------------------------------------------- RELION


@pytest.fixture(scope="module")
def relion_project(tmp_path_factory, simulated) -> dict:
    """A RELION project (``Extract/job012/Movies/*.mrcs``, ``Select/job020/particles.star``
    naming them relative to the project folder) and cryoai run in it, from the project folder:
    ``info --check-images``, ``train`` into ``External/job031/``, ``predict-poses``."""
    project = tmp_path_factory.mktemp("relion_project")
    movies = project / "Extract" / "job012" / "Movies"
    movies.mkdir(parents=True)
    renamed = {}
    for k in range(N // PER_STACK):
        name = f"Extract/job012/Movies/mic_{k + 1:03d}.mrcs"
        shutil.copy(simulated / f"particles_{k:03d}.mrcs", project / name)
        renamed[f"particles_{k:03d}.mrcs"] = name
    blocks = starfile.read(simulated / "particles.star", always_dict=True)
    particles = blocks["particles"].drop(columns=[c for c in POSE_LABELS if c in blocks["particles"]])
    names = []
    for value in particles["rlnImageName"]:
        number, _, stack = value.partition("@")
        names.append(f"{number}@{renamed[stack]}")
    particles["rlnImageName"] = names
    particles["rlnRandomSubset"] = np.arange(N) % 2 + 1  # as a refinement's output has them
    select = project / "Select" / "job020"
    select.mkdir(parents=True)
    starfile.write({"optics": blocks["optics"], "particles": particles}, select / "particles.star")
    new = project / "Select" / "job021"  # a few "new" particles, for predict-poses
    new.mkdir(parents=True)
    starfile.write({"optics": blocks["optics"], "particles": particles.iloc[:8]}, new / "particles.star")

    patch = pytest.MonkeyPatch()
    try:
        patch.chdir(project)
        with contextlib.redirect_stdout(io.StringIO()) as info:
            assert main(["info", "Select/job020/particles.star", "--check-images"]) == 0
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", "Select/job020/particles.star", "--outdir", "External/job031",
                         *QUICK_TRAIN]) == 0
            assert main(["predict-poses", "External/job031/checkpoint.pt", "Select/job021/particles.star",
                         "--out", "External/job032/poses.star", "--device", "cpu", "--quiet"]) == 0
            assert main(["predict-poses", "External/job031/checkpoint.pt", "Select/job021/particles.star",
                         "--out", "External/job032/poses_absolute.cs", "--image-paths", "absolute",
                         "--device", "cpu", "--quiet"]) == 0
    finally:
        patch.undo()
    images = {name: _images(project / name) for name in renamed.values()}
    return {"project": project, "names": names, "images": images, "info": info.getvalue()}


def test_relion_project_info_finds_the_stacks_from_the_project_folder(relion_project):
    out = relion_project["info"]
    assert f"particles:          {N} in 2 stack(s)" in out
    assert "all references resolve" in out


def test_relion_project_outputs_keep_the_project_relative_names(relion_project, monkeypatch):
    project, names = relion_project["project"], relion_project["names"]
    monkeypatch.chdir(project)
    for path, expected in (("External/job031/poses.star", names), ("External/job032/poses.star", names[:8])):
        text = Path(path).read_text()
        assert text.count("# version 30001") == 2, path  # before data_optics and data_particles
        rows = starfile.read(path, always_dict=True)["particles"]
        assert list(rows["rlnImageName"]) == expected, path
        assert all(c in rows for c in POSE_LABELS), path
        _check_images_open(list(rows["rlnImageName"]), relion_project["images"])
        assert set(rows["rlnRandomSubset"]) <= {1, 2}  # the input's, or the run's half sets
        validate_images(load_particles(path))  # and cryoai reads its output back from here

    from cryosparc.dataset import Dataset

    ds = Dataset.load("External/job031/poses.cs")
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in ds["blob/path"]]
    assert paths == [_stack_name_and_index(n)[1] for n in names]
    np.testing.assert_array_equal(ds["blob/idx"], [_stack_name_and_index(n)[0] for n in names])
    for field in ("blob/sign", "ctf/exp_group_id", "alignments3D/pose", "alignments3D/shift"):
        assert field in ds.fields(), field
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], 1)  # the STAR's optics group

    absolute = Dataset.load("External/job032/poses_absolute.cs")  # --image-paths absolute
    paths = [p.decode() if isinstance(p, bytes) else str(p) for p in absolute["blob/path"]]
    assert paths == [str((project / _stack_name_and_index(n)[1]).absolute()) for n in names[:8]]
    invert = yaml.safe_load(Path("External/job031/config.yaml").read_text())["invert_contrast"]
    np.testing.assert_array_equal(absolute["blob/sign"], -1.0 if invert else 1.0)


def test_relion_project_output_read_from_elsewhere_with_datadir(relion_project, tmp_path, monkeypatch):
    """Away from the project folder, the project-relative names resolve under --datadir."""
    project = relion_project["project"]
    monkeypatch.chdir(tmp_path)
    table = load_particles(project / "External/job031/poses.star", datadir=project)
    validate_images(table)
    assert sorted(table.stack_files) == sorted(str(project / name) for name in relion_project["images"])


def test_report_runs_without_starfile(relion_project, monkeypatch):
    """``starfile`` is in the test extra only: the report must not need it."""
    monkeypatch.chdir(relion_project["project"])
    monkeypatch.setitem(sys.modules, "starfile", None)  # ``import starfile`` now fails
    with pytest.raises(ImportError):
        import starfile  # noqa: F401
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", "External/job031"]) == 0
    page = Path("External/job031/report/report.html").read_text()
    assert "<h2>Viewing directions</h2>" in page  # the poses and their junk calls were read


# --------------------------------------------------------------------------------- cryoSPARC


@pytest.fixture(scope="module")
def cryosparc_project(tmp_path_factory, simulated) -> dict:
    """A cryoSPARC project: ``J12/extract/*_particles.mrc`` and ``J20/J20_particles_selected.cs``
    (written with cryosparc-tools) whose ``blob/path`` is relative to the project folder, as
    cryoSPARC writes it; cryoai run from the project folder into ``cryoai/run1/``."""
    from cryosparc.dataset import Dataset

    project = tmp_path_factory.mktemp("cryosparc_project")
    (project / "J12" / "extract").mkdir(parents=True)
    (project / "J20").mkdir()
    table = load_particles(simulated / "particles.star", read_poses=False)
    renamed = {}
    for k in range(N // PER_STACK):
        name = f"J12/extract/{k + 1:03d}_mic_{k + 1:03d}_particles.mrc"
        shutil.copy(simulated / f"particles_{k:03d}.mrcs", project / name)
        renamed[f"particles_{k:03d}.mrcs"] = name
    stack_of = np.array([renamed[Path(s).name] for s in table.stack_files])[table.stack_ids]
    ds = Dataset.allocate(N, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/type", "O"),
                              ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
                              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                              ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")])
    ds["blob/path"] = stack_of
    ds["blob/idx"] = table.stack_indices
    ds["blob/shape"] = np.full((N, 2), BOX)
    ds["blob/psize_A"] = table.pixel_size_a
    ds["blob/sign"] = 1.0  # cryoai's simulated protein is bright
    ds["ctf/type"] = "imported"
    ds["ctf/exp_group_id"] = 3
    for field, values in (("ctf/accel_kv", table.voltage_kv), ("ctf/cs_mm", table.cs_mm),
                          ("ctf/amp_contrast", table.amplitude_contrast), ("ctf/df1_A", table.defocus_u_a),
                          ("ctf/df2_A", table.defocus_v_a), ("ctf/df_angle_rad", table.defocus_angle_rad),
                          ("ctf/phase_shift_rad", table.phase_shift_rad)):
        ds[field] = values
    ds.save(str(project / "J20" / "J20_particles_selected.cs"))

    patch = pytest.MonkeyPatch()
    try:
        patch.chdir(project)
        with contextlib.redirect_stdout(io.StringIO()) as info:
            assert main(["info", "J20/J20_particles_selected.cs", "--check-images"]) == 0
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", "J20/J20_particles_selected.cs", "--outdir", "cryoai/run1",
                         *QUICK_TRAIN]) == 0
            assert main(["predict-poses", "cryoai/run1/checkpoint.pt", "J20/J20_particles_selected.cs",
                         "--out", "cryoai/predicted/poses.cs", "--device", "cpu", "--quiet"]) == 0
    finally:
        patch.undo()
    images = {name: _images(project / name) for name in renamed.values()}
    names = [f"{i + 1:06d}@{s}" for i, s in zip(table.stack_indices, stack_of, strict=True)]
    return {"project": project, "names": names, "images": images, "info": info.getvalue()}


def test_cryosparc_project_info_finds_the_stacks(cryosparc_project):
    assert f"particles:          {N} in 2 stack(s)" in cryosparc_project["info"]
    assert "all references resolve" in cryosparc_project["info"]


def test_cryosparc_project_outputs_keep_the_project_relative_names(cryosparc_project, monkeypatch):
    from cryosparc.dataset import Dataset

    project, names = cryosparc_project["project"], cryosparc_project["names"]
    monkeypatch.chdir(project)
    stacks = [_stack_name_and_index(n)[1] for n in names]
    indices = [_stack_name_and_index(n)[0] for n in names]
    for path in ("cryoai/run1/poses.cs", "cryoai/predicted/poses.cs"):
        ds = Dataset.load(path)
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in ds["blob/path"]]
        assert paths == stacks, path
        np.testing.assert_array_equal(ds["blob/idx"], indices)
        np.testing.assert_array_equal(ds["blob/sign"], 1.0)  # as read
        np.testing.assert_array_equal(ds["ctf/exp_group_id"], 3)  # as read
        assert "alignments3D/pose" in ds.fields()
        _check_images_open(names, cryosparc_project["images"])
        validate_images(load_particles(path))
    rows = starfile.read("cryoai/run1/poses.star", always_dict=True)["particles"]
    assert list(rows["rlnImageName"]) == names
    assert isinstance(rows, pd.DataFrame) and all(c in rows for c in POSE_LABELS)
