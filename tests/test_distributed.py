"""Data-parallel training with torch.distributed: two CPU processes started by torchrun (gloo)
take the same steps as one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _cli_util import simulate_small
from cryoai.training.checkpoint import load_checkpoint

N_PARTICLES = 30  # global batches of 16 and 14: the second one splits 7 + 7


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "sim"
    return simulate_small(out, N_PARTICLES, seed=8)


def _args(sim: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(sim / "particles.star"), "--outdir", str(out), "--max-epochs", "2",
            "--batch-size", "16", "--log-every", "1", "--seed", "5", "--device", "cpu", "--quiet",
            "--no-tensorboard", "--pose-encoder", "off", *extra]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
            if '"step"' in line]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_two_process_step_equals_one_process_step(sim, tmp_path):
    """Known poses, voxel decoder (with its Wiener start): after each step the parameters, the
    global-batch loss and the gradient norm of 2 ranks equal those of 1 process."""
    extra = ["--poses", str(sim / "particles.star")]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "cryoai.cli.main", *_args(sim, one, *extra)])
    _run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "cryoai.cli.main",
          *_args(sim, two, *extra)])
    out = json.loads((two / "outputs.json").read_text())
    assert out["world_size"] == 2 and out["images_seen"] == 2 * N_PARTICLES
    log1, log2 = _log(one), _log(two)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3, 4]
    for a, b in zip(log1, log2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    p1 = load_checkpoint(one / "checkpoint.pt")["model"]
    p2 = load_checkpoint(two / "checkpoint.pt")["model"]
    # The Wiener start's sums are split between the ranks and added (reconstruction/shard.py), so
    # the start agrees to float rounding, not bit for bit; Adam's first steps turn such rounding
    # in near-zero gradients into steps of up to the learning rate in a few voxels: the
    # parameters agree as a whole, not voxel by voxel.
    for k in p1:
        diff = float((p2[k] - p1[k]).norm() / p1[k].norm().clamp_min(1e-12))
        assert diff < 1e-3, (k, diff)
    assert not list(two.glob(".*.tmp"))


def test_two_process_encoder_training_runs_and_resumes(sim, tmp_path):
    """Ab initio with the encoder on 2 ranks (BatchNorm per rank on CPU), then --resume for
    more epochs: rank 0 writes the outputs, the run continues from its checkpoint. Global
    batches of 29 and 1 particles: in the second one rank 1's shard is empty."""
    out = tmp_path / "enc"
    extra = ["--ab-initio", "encoder", "--encoder-width", "0.125", "--batch-size", "29"]
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "cryoai.cli.main"]
    _run([*cmd, *_args(sim, out, *extra)])
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 4
    assert (out / "poses.star").exists() and (out / "volume.mrc").exists()
    _run([*cmd, *_args(sim, out, *extra), "--resume", "--max-epochs", "3"])
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 6
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]


_SHARDED = r'''
import sys
import numpy as np
import torch
from cryoai.data.dataset import ParticleDataset
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.pipeline.settings import assignment_settings
from cryoai.reconstruction import ParticleSpectra, PoseAssigner, assign_remaining, reconstruct
from cryoai.reconstruction.pose_search import SubsetSearch
from cryoai.reconstruction.regularised import half_set_sums
from cryoai.reconstruction.shard import ALONE
from cryoai.training.config import TrainConfig
from cryoai.training.distributed import init_distributed, particle_shard, shutdown

star, out = sys.argv[1], sys.argv[2]
info, _ = init_distributed(torch.device("cpu"))
shard = particle_shard(info) if info.enabled else ALONE
table = load_particles(star)
formation = ImageFormation(table.box_px, table.median_pixel_size_a())
spectra = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
poses = table.poses()
subset = np.arange(0, len(table), 3)
y, c = spectra.read(subset)
volume = reconstruct(spectra, poses, mask_radius_px=14.0).fourier_volume
found = SubsetSearch(subset=subset, rotations=poses.rotations[subset],
                     shifts_px=poses.shifts_a[subset] / formation.pixel_size_a, fourier_volume=volume,
                     spectra=y, ctf=c)
assigner = PoseAssigner(formation, volume, assignment_settings(TrainConfig(), table.box_px))
assigned = assign_remaining(spectra, found, assigner, log=lambda _: None, block=7, shard=shard)
from cryoai.reconstruction.particle_scores import score_particles
scores = score_particles(spectra, volume, poses, 8.0, shard=shard)
sums = half_set_sums(spectra, poses, seed=1, shard=shard)
if info.rank == 0:
    np.savez(out, rotations=assigned.rotations.numpy(), shifts=assigned.shifts_a.numpy(),
             num=sums[0][0].numpy(), den=sums[1][1].numpy(), score=scores.score, amplitude=scores.amplitude)
shutdown()
'''


def test_two_ranks_share_the_assignment_and_the_sums_and_get_what_one_process_gets(sim, tmp_path):
    """The stages that visit every particle, split between 2 ranks (each poses, back-projects and
    scores its block, the results added over the ranks): the poses, sums and scores of one process."""
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    star = str(sim / "particles.star")
    _run([sys.executable, str(script), star, str(tmp_path / "one.npz")])
    _run([*_torchrun(), "--standalone", "--nproc_per_node", "2", str(script), star,
          str(tmp_path / "two.npz")])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.abs(one["rotations"]).sum() > 0 and np.abs(one["rotations"] - np.eye(3)).max() > 0.5
    np.testing.assert_allclose(two["rotations"], one["rotations"], atol=1e-4)
    np.testing.assert_allclose(two["shifts"], one["shifts"], atol=1e-3)
    for key in ("num", "den", "score", "amplitude"):
        scale = np.abs(one[key]).max()
        np.testing.assert_allclose(two[key], one[key], atol=1e-5 * scale)
