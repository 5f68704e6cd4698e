"""A small ab initio case: poses and map from images alone (L=32, noise-free)."""

from __future__ import annotations

import json

import numpy as np
import torch

from cryoai.cli.main import main as cli
from cryoai.io import load_particles
from cryoai.physics.rotations import geodesic_distance


def test_small_ab_initio_finds_poses(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "400", "--no-noise", "--shift-sigma-a", "10",
                "--seed", "3", "--outdir", str(sim), "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
                "--search-iterations", "60", "--search-batch", "300",
                "--refine-rounds", "4", "--decoder-epochs", "1", "--seed", "0",
                "--encoder-minutes", "0.1"]) == 0
    ev = tmp_path / "eval"
    assert cli(["evaluate", "--map", str(run / "volume.mrc"), "--poses", str(run / "poses.star"),
                "--gt-map", str(sim / "ground_truth.mrc"), "--gt-poses", str(sim / "particles.star"),
                "--outdir", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["rotation_error_deg_median"] < 10.0, metrics["rotation_error_deg_median"]
    assert metrics["resolution_px_0.5"] < 4.0, metrics["resolution_px_0.5"]

    # predict-poses serves a search-mode run: the particles assigned against the run's map get
    # poses in the run's frame, close to the run's own and to the truth.
    new = tmp_path / "predicted.star"
    assert cli(["predict-poses", str(run / "checkpoint.pt"), str(sim / "particles.star"),
                "--out", str(new), "--quiet"]) == 0
    ours = load_particles(run / "poses.star")
    theirs = load_particles(new)
    angle = geodesic_distance(torch.as_tensor(ours.rotations), torch.as_tensor(theirs.rotations))
    # Measured 3.3 deg: the final map is sharper than the search's, so the poses move a little
    # (towards the truth); a wrong frame would put them tens of degrees away.
    assert float(torch.rad2deg(angle).median()) < 6.0, float(torch.rad2deg(angle).median())
    shift_px = np.linalg.norm(ours.shifts_a - theirs.shifts_a, axis=1) / ours.median_pixel_size_a()
    assert float(np.median(shift_px)) < 0.75, float(np.median(shift_px))  # measured 0.31 px
    ev2 = tmp_path / "eval_predicted"
    assert cli(["evaluate", "--map", str(run / "volume.mrc"), "--poses", str(new),
                "--gt-map", str(sim / "ground_truth.mrc"), "--gt-poses", str(sim / "particles.star"),
                "--outdir", str(ev2)]) == 0
    predicted = json.loads((ev2 / "metrics.json").read_text())
    # Measured 3.0 deg against the truth (the run's own poses: 5.7 deg).
    assert predicted["rotation_error_deg_median"] < 5.0, predicted["rotation_error_deg_median"]


def test_initial_map_starts_the_search_and_fixes_the_frame(tmp_path):
    """``--initial-map``: the search starts from the given map (low-passed) at its final band, so
    the poses come out in that map's frame: against the truth with no global alignment."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "300", "--snr-db", "0", "--shift-sigma-a", "5",
                "--seed", "5", "--outdir", str(sim), "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet", "--no-tensorboard",
                "--initial-map", str(sim / "ground_truth.mrc"), "--search-iterations", "20",
                "--search-batch", "150", "--search-retries", "0", "--pose-encoder", "off",
                "--decoder-epochs", "0.2"]) == 0
    got = torch.as_tensor(load_particles(run / "poses.star").rotations)
    truth = torch.as_tensor(load_particles(sim / "particles.star").rotations)
    angle = torch.rad2deg(geodesic_distance(got, truth))  # no alignment: the map's own frame
    assert float(angle.median()) < 10, float(angle.median())


def test_initial_map_of_another_box_is_refused_before_the_run_starts(tmp_path, capsys):
    sim, other = tmp_path / "sim", tmp_path / "other"
    for box, n, out in (("24", "20", sim), ("32", "2", other)):
        assert cli(["simulate", "--box", box, "--n", n, "--snr-db", "0", "--outdir", str(out),
                    "--quiet"]) == 0
    # a map of another extent (32 px of 5 A: 160 A, the particles' box 320 A) is refused
    from cryoai.io import read_volume, write_volume
    from cryoai.pipeline.search import read_initial_map

    volume, voxel_a = read_volume(other / "ground_truth.mrc")
    write_volume(other / "ground_truth.mrc", volume, 5.0)
    run = tmp_path / "run"
    rc = cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
              "--initial-map", str(other / "ground_truth.mrc")])
    err = capsys.readouterr().err
    assert rc != 0 and "ground_truth.mrc: box 32 differs from the particles' 24" in err
    assert not run.exists()
    # the same extent at a larger box (a full-box map for a search at a smaller working box) is
    # Fourier-cropped to the particles' box
    write_volume(other / "same_extent.mrc", volume, voxel_a)
    cropped = read_initial_map(str(other / "same_extent.mrc"), 24, voxel_a * 32 / 24)
    assert cropped.shape == (24, 24, 24)
    assert abs(cropped.mean() - volume.mean()) < 1e-3 * abs(volume).max()  # the crop keeps the mean
