"""Runs that are killed, interrupted or diverge: no work is lost, nothing is left half-written,
and a resumed run ends where an uninterrupted one does; the same seed gives the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_util import simulate_small
from cryoai.cli.main import main
from cryoai.io import read_volume
from cryoai.training.checkpoint import load_checkpoint
from cryoai.training.trainer import Trainer

N_PARTICLES = 160


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "sim"
    return simulate_small(out, N_PARTICLES, seed=3)


def _train_args(sim: Path, outdir: Path, epochs: int = 60) -> list[str]:
    # Known poses, voxel decoder, small batches: many cheap steps, a checkpoint at every step.
    return ["train", str(sim / "particles.star"), "--poses", str(sim / "particles.star"),
            "--outdir", str(outdir), "--max-epochs", str(epochs), "--batch-size", "8",
            "--no-wiener-init", "--checkpoint-every-minutes", "0", "--volume-every-minutes", "0.02",
            "--log-every", "1", "--seed", "7", "--device", "cpu", "--quiet", "--no-tensorboard"]


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cryoai.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    p = _spawn(args)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def _last_step(outdir: Path) -> int:
    log = outdir / "train_log.jsonl"
    if not log.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()
             and line.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(p: subprocess.Popen, outdir: Path, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    while _last_step(outdir) < step:
        assert p.poll() is None, f"the run ended before step {step}: {p.communicate()[1]}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(sim, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(_train_args(sim, out))
    return out


TOTAL_STEPS = 60 * N_PARTICLES // 8


def test_sigkill_then_resume_matches_uninterrupted_run(sim, reference, tmp_path):
    """SIGKILL twice at different points of a run; --resume each time; the final map and
    checkpoint equal those of the uninterrupted run (same seed, CPU)."""
    out = tmp_path / "run"
    for kill_at in (TOTAL_STEPS // 4, TOTAL_STEPS // 2):
        args = _train_args(sim, out) + (["--resume"] if (out / "checkpoint.pt").exists() else [])
        p = _spawn(args)
        _wait_for_step(p, out, kill_at)
        p.send_signal(signal.SIGKILL)
        p.communicate()  # waits, and closes the pipes
        assert p.returncode == -signal.SIGKILL
        ckpt = load_checkpoint(out / "checkpoint.pt")  # always a whole checkpoint
        assert 0 < ckpt["state"]["step"] < TOTAL_STEPS
    _run(_train_args(sim, out) + ["--resume"])
    assert not list(out.glob(".*.tmp")), "temporary files of killed writes were left behind"
    ref_vol, _ = read_volume(reference / "volume.mrc")
    vol, _ = read_volume(out / "volume.mrc")
    np.testing.assert_allclose(vol, ref_vol, rtol=0, atol=1e-5 * np.abs(ref_vol).max())
    a = load_checkpoint(reference / "checkpoint.pt")
    b = load_checkpoint(out / "checkpoint.pt")
    assert a["state"]["step"] == b["state"]["step"] == TOTAL_STEPS
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert steps == sorted(set(steps)), "the log holds repeated steps after the resumes"


def test_sigint_stops_cleanly_with_a_checkpoint(sim, tmp_path):
    out = tmp_path / "run"
    p = _spawn(_train_args(sim, out))
    _wait_for_step(p, out, TOTAL_STEPS // 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    step = load_checkpoint(out / "checkpoint.pt")["state"]["step"]
    assert TOTAL_STEPS // 3 <= step < TOTAL_STEPS
    assert np.isfinite(read_volume(out / "volume.mrc")[0]).all()
    _run(_train_args(sim, out) + ["--resume"])
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == TOTAL_STEPS


def test_nan_loss_stops_and_keeps_last_good_outputs(sim, tmp_path, monkeypatch, capsys):
    """A NaN injected into the loss at step 30 stops the run with a one-line message; the
    state after step 30 (the last good one) is saved as checkpoint and map, and nothing that
    only a finished run writes (poses, outputs.json) appears."""
    original = Trainer.loss_on_batch

    def poisoned(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.state.step == 30 else loss

    monkeypatch.setattr(Trainer, "loss_on_batch", poisoned)
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(_train_args(sim, out, epochs=5))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "loss became nan at step 30" in err[0], err
    assert "last good state (step 30)" in err[0]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] == 30
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert np.isfinite(read_volume(out / "volume.mrc")[0]).all()
    assert not (out / "poses.star").exists() and not (out / "outputs.json").exists()


def test_same_seed_same_result_encoder_mode(sim, tmp_path):
    """Two ab initio (encoder) runs with the same seed give identical weights."""
    common = ["--ab-initio", "encoder", "--max-epochs", "1", "--batch-size", "16",
              "--encoder-width", "0.125", "--seed", "11", "--device", "cpu", "--quiet", "--no-tensorboard"]
    for name in ("a", "b"):
        assert main(["train", str(sim / "particles.star"), "--outdir", str(tmp_path / name), *common]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_background_loading_gives_the_same_run(sim, tmp_path):
    """DataLoader workers read ahead in other processes; the batches, hence the result, are
    those of reading in the training process."""
    ckpts = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        assert main([*_train_args(sim, out, epochs=2), "--num-workers", workers,
                     "--checkpoint-every-minutes", "100"]) == 0
        ckpts[workers] = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in ckpts["0"].items():
        torch.testing.assert_close(ckpts["2"][k], v, rtol=0, atol=0)


def test_bad_image_found_by_a_loader_worker_is_one_line(sim, tmp_path, capsys):
    """A NaN image met in a DataLoader worker (not in the start-up sample) still gives a
    one-line message naming the stack and the image."""
    import shutil

    import mrcfile

    copy = tmp_path / "sim"
    shutil.copytree(sim, copy)
    with mrcfile.open(copy / "particles_000.mrcs", mode="r+") as m:
        m.data[77, 5, 5] = np.nan
    out = tmp_path / "run"
    capsys.readouterr()
    # FourierNet without the reconstruction start, white noise assumed (no noise spectrum
    # measured): nothing reads every image before training.
    rc = main([*_train_args(copy, out, epochs=1), "--num-workers", "1", "--normalize-samples", "8",
               "--decoder", "fouriernet", "--fouriernet-width", "16", "--noise-model", "white"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "particles_000.mrcs" in err[0] and "image 78," in err[0], err[0]
    # Met during training, not by the start-up checks: the work so far is kept.
    assert "the state at step" in err[0]
    assert (out / "checkpoint.pt").exists() and (out / "volume.mrc").exists()
