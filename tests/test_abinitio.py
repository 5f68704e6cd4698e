"""A small ab initio case: poses and map from images alone (L=32, noise-free)."""

from __future__ import annotations

import json

from cryoai.cli.main import main as cli


def test_small_ab_initio_finds_poses(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "400", "--no-noise", "--shift-sigma-a", "10",
                "--seed", "3", "--outdir", str(sim), "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
                "--search-iterations", "60", "--search-batch", "300",
                "--refine-rounds", "4", "--decoder-epochs", "1", "--seed", "0"]) == 0
    ev = tmp_path / "eval"
    assert cli(["evaluate", "--map", str(run / "volume.mrc"), "--poses", str(run / "poses.star"),
                "--gt-map", str(sim / "ground_truth.mrc"), "--gt-poses", str(sim / "particles.star"),
                "--outdir", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["rotation_error_deg_median"] < 10.0, metrics["rotation_error_deg_median"]
    assert metrics["resolution_px_0.5"] < 4.0, metrics["resolution_px_0.5"]
