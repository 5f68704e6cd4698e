"""The README's library example runs, and gives what ``cryoai train`` gives on the same set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoai.cli.main import main as cli
from cryoai.io import load_particles

README = Path(__file__).resolve().parents[2] / "README.md"
#: A short run (the defaults' search and polish, shortened): the same options as flags and fields.
QUICK = {"pose_encoder": "off", "search_iterations": 15, "refine_rounds": 2, "decoder_epochs": 0.2,
         "search_retries": 0, "tensorboard": False}


def _flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("readme")
    assert cli(["simulate", "--box", "32", "--n", "200", "--snr-db", "-5", "--seed", "3", "--outdir",
                str(out / "sim"), "--quiet", "--device", "cpu"]) == 0
    return out


def test_the_readme_example_runs_and_gives_the_cli_result(small_set, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'run_default(load_particles("particles.star"), TrainConfig(), outdir="run/")' in code
    monkeypatch.chdir(small_set / "sim")
    namespace = {"QUICK": QUICK}
    exec(code.replace("TrainConfig()", "TrainConfig(**QUICK)"), namespace)  # the README's lines
    result = namespace["result"]
    table = load_particles("particles.star")
    assert len(result.poses) == len(table) and result.volume.shape == (table.box_px,) * 3
    stages = [r.stage for r in result.stages]
    for name in ("noise", "search_plan", "search_done", "assignment", "junk", "reconstruction", "views"):
        assert name in stages, stages
    assert result.stage("search_done").figures["attempts"] == 1
    # the run's maps: its own first, with its half maps and the particles it was made of
    own = result.maps[0]
    assert own.name == "map" and own.file == "volume.mrc" and own.symmetry == "C1"
    assert own.half_maps is not None and len(own.particles) == int(result.kept.sum())
    assert own.resolution_px >= 2.0
    # ``cryoai train`` with the same options: the same poses and map, digit for digit
    assert cli(["train", "particles.star", "--outdir", "cli-run", "--quiet", "--device", "cpu",
                *_flags(QUICK)]) == 0
    outputs = json.loads(Path("cli-run/outputs.json").read_text())
    assert outputs["steps"] == result.outputs["steps"]
    assert outputs.get("warnings", []) == result.warnings
    written = load_particles("run/poses.star").poses()
    np.testing.assert_array_equal(load_particles("cli-run/poses.star").poses().rotations.numpy(),
                                  written.rotations.numpy())
    with mrcfile.open("cli-run/volume.mrc") as a, mrcfile.open("run/volume.mrc") as b:
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(result.volume, b.data)  # the result holds what was written
    np.testing.assert_allclose(result.poses.rotations.numpy(), written.rotations.numpy(), atol=1e-4)
    # the half set each particle's map went to, as RELION and cryoSPARC read it; the images'
    # contrast (simulated: protein bright) as cryoSPARC's blob/sign
    import starfile
    from cryosparc.dataset import Dataset

    from cryoai.reconstruction.regularised import half_sets

    star = starfile.read("run/poses.star", always_dict=True)["particles"]
    expected = np.ones(len(table), dtype=int)
    expected[half_sets(len(table), 0)[1]] = 2
    np.testing.assert_array_equal(star["rlnRandomSubset"].to_numpy(), expected)
    assert "# version 30001" in Path("run/poses.star").read_text().splitlines()[:4]
    cs = Dataset.load("run/poses.cs")
    np.testing.assert_array_equal(cs["alignments3D/split"], expected - 1)
    assert set(np.unique(cs["blob/sign"])) == {1.0}
    # the run's log and its report: the search's convergence, the time per stage, the summary
    assert "summary:" in Path("run/run.log").read_text() and "search plan:" in Path("run/run.log").read_text()
    assert cli(["report", "run"]) == 0
    page = Path("run/report/report.html").read_text()
    for title in ("Summary", "Search convergence", "Time per stage", "Fourier shell correlation"):
        assert f"<h2>{title}</h2>" in page, title
    assert "<h2>Training curves</h2>" not in page  # (the polish's loss is not the run)
    summary = page.split('id="summary"')[1].split("</table>")[0]
    assert "in the map" in summary and "called junk" in summary and "explains" in summary
    assert 'class="warn"' in page  # the run warned (a short search): said in the box
