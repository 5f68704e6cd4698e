"""Losses, pose choice, the training loop and the train / predict-poses commands."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
import yaml
from torch import nn

from cryoai.assets import embedded_map_path
from cryoai.cli.main import main as cryoai_main
from cryoai.data.dataset import ParticleBatch
from cryoai.data.loader import make_loader
from cryoai.errors import InputError
from cryoai.evaluation.metrics import fsc_report
from cryoai.io import load_particles, read_volume
from cryoai.io.mrc import read_header
from cryoai.models.cryoai import CryoAI
from cryoai.models.decoders import VoxelDecoder
from cryoai.physics.ctf import compute_ctf
from cryoai.physics.fft import fft2_c, fourier_crop_3d, ifft2_c
from cryoai.physics.grids import frequency_grid_2d
from cryoai.physics.projection import project_fourier
from cryoai.physics.rotations import in_plane_180, random_rotations
from cryoai.physics.shifts import rotate_180, shift_images
from cryoai.training.checkpoint import load_checkpoint, save_checkpoint
from cryoai.training.config import TrainConfig
from cryoai.training.losses import squared_error, symmetric_loss
from cryoai.training.poses import choose_poses
from cryoai.training.trainer import Trainer

N = 32
PIXEL_A = 10.0  # the embedded 64 px / 5 A map cropped to 32 px
N_PARTICLES = 600
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
# A short encoder stage: these tests are about other stages (tests/test_amortized.py tests it).
FAST = ["--quiet", "--no-tensorboard", "--device", "cpu", "--encoder-minutes", "0.05"]




# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """600 noise-free 32 px particles with shifts (sigma 1 px), true poses in the STAR."""
    out = tmp_path_factory.mktemp("sim") / "sim"
    rc = cryoai_main(["simulate", "--box", str(N), "--n", str(N_PARTICLES), "--no-noise",
                      "--shift-sigma-a", "10", "--seed", "0", "--outdir", str(out), "--quiet",
                      "--device", "cpu"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def no_pose_star(sim) -> Path:
    """The simulated particles without poses and origins, with an extra column to carry."""
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    parts = blocks["particles"].drop(columns=ANGLES + ["rlnOriginXAngst", "rlnOriginYAngst"])
    parts["rlnRandomSubset"] = np.arange(len(parts)) % 2 + 1
    blocks["particles"] = parts
    path = sim / "no_poses.star"
    starfile.write(blocks, path)
    return path


@pytest.fixture(scope="module")
def abinitio_run(sim, no_pose_star, tmp_path_factory) -> Path:
    """A few steps of amortized ab initio training (encoder + decoder, no --poses)."""
    out = tmp_path_factory.mktemp("abinitio") / "run"
    rc = cryoai_main(["train", str(no_pose_star), "--outdir", str(out), "--max-epochs", "0.1",
                      "--ab-initio", "encoder",
                      "--batch-size", "16", "--encoder-width", "0.125", *FAST])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    vol, _ = read_volume(embedded_map_path())
    return fourier_crop_3d(torch.as_tensor(vol, dtype=torch.float64), N).float()


# -------------------------------------------------------------------------------- losses
def test_symmetric_loss_is_min_over_image_and_rotated_image():
    model = CryoAI(N, PIXEL_A, nn.Identity())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, N, N, generator=gen)
    other = torch.randn(16, N, N, generator=gen)
    # Predictions near the rotated image for half the batch, near the image for the rest.
    other[:8] = rotate_180(images[:8]) + 0.1 * other[:8]
    other[8:] = images[8:] + 0.1 * other[8:]
    pred = model.image_spectra(other)
    w = model.formation.hermitian_weight
    sym = symmetric_loss(model.image_spectra(images), pred, w)
    plain = squared_error(model.image_spectra(images), pred, w)
    rotated = squared_error(model.image_spectra(rotate_180(images)), pred, w)
    torch.testing.assert_close(sym, torch.minimum(plain, rotated), rtol=1e-5, atol=0)
    # Both branches win somewhere, so the test tells the two apart.
    assert bool((rotated[:8] < plain[:8]).all())
    assert bool((plain[8:] < rotated[8:]).all())


# ----------------------------------------------------------------------------- pose choice
class _FixedEncoder(nn.Module):
    """Stands in for the PoseEncoder: returns the given poses whatever the images."""

    def __init__(self, rotations: torch.Tensor, shifts_a: torch.Tensor):
        super().__init__()
        self.rotations, self.shifts_a = rotations, shifts_a

    def forward(self, images):
        return self.rotations, self.shifts_a


def _ctf_batch(b: int) -> ParticleBatch:
    g = torch.Generator().manual_seed(5)
    du = 10000 + 10000 * torch.rand(b, generator=g)
    return ParticleBatch(images=torch.zeros(b, N, N), index=torch.arange(b),
                         pixel_size_a=torch.full((b,), PIXEL_A), defocus_u_a=du, defocus_v_a=du - 200,
                         defocus_angle_rad=torch.rand(b, generator=g), voltage_kv=torch.full((b,), 300.0),
                         cs_mm=torch.full((b,), 2.7), amplitude_contrast=torch.full((b,), 0.1),
                         phase_shift_rad=torch.zeros(b), bfactor_a2=torch.zeros(b))


def _images_at(volume, rotations, shifts_a, batch) -> torch.Tensor:
    """Images through the physics module (not the model): project, shift, apply the CTF."""
    proj = project_fourier(volume, rotations, oversample=1)
    shifted = shift_images(proj, shifts_a / PIXEL_A)
    ctf = compute_ctf(frequency_grid_2d(N, PIXEL_A), *[getattr(batch, k) for k in (
        "defocus_u_a", "defocus_v_a", "defocus_angle_rad", "voltage_kv", "cs_mm",
        "amplitude_contrast", "phase_shift_rad", "bfactor_a2")])
    return ifft2_c(fft2_c(shifted) * ctf).real


def test_choose_poses_resolves_the_in_plane_flip(volume):
    b = 6
    gen = torch.Generator().manual_seed(1)
    r0 = random_rotations(b, generator=gen)
    t0 = (torch.rand(b, 2, generator=gen) - 0.5) * 40  # Angstrom, up to 2 px
    batch = _ctf_batch(b)
    batch.images = _images_at(volume, r0, t0, batch)
    model = CryoAI(N, PIXEL_A, VoxelDecoder(N, init_volume=volume))

    # The encoder answers the pose of the image rotated by 180 degrees: (R0 Rz(pi), -t0).
    model.encoder = _FixedEncoder(in_plane_180(r0)[:, None], -t0[:, None])
    r, t, loss = choose_poses(model, batch, None)
    torch.testing.assert_close(r, r0, rtol=0, atol=1e-5)
    torch.testing.assert_close(t, t0, rtol=0, atol=1e-4)
    scale = float((model.image_spectra(batch.images).abs() ** 2).sum(-1).min())
    assert float(loss.max()) < 1e-6 * scale

    # Without the symmetric loss the flip is not considered: the answer is kept as is.
    r, t, _ = choose_poses(model, batch, None, use_symmetric=False)
    torch.testing.assert_close(r, in_plane_180(r0), rtol=0, atol=1e-5)

    # The direct answer is kept unflipped.
    model.encoder = _FixedEncoder(r0[:, None], t0[:, None])
    r, t, _ = choose_poses(model, batch, None)
    torch.testing.assert_close(r, r0, rtol=0, atol=1e-5)
    torch.testing.assert_close(t, t0, rtol=0, atol=1e-4)

    # Several heads: a wrong hypothesis first, the flipped one second.
    wrong = random_rotations(b, generator=gen)
    rots = torch.stack([wrong, in_plane_180(r0)], dim=1)
    model.encoder = _FixedEncoder(rots, (-t0)[:, None].expand(b, 2, 2))
    r, t, _ = choose_poses(model, batch, None)
    torch.testing.assert_close(r, r0, rtol=0, atol=1e-5)
    torch.testing.assert_close(t, t0, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ training
def _trainer(table, cfg, outdir, fixed: bool) -> Trainer:
    """The fitting loop of a run on ``table`` as the pipeline builds it, at the table's poses if
    ``fixed`` else the encoder's.
    """
    from cryoai.pipeline.run import fitting_loop

    return fitting_loop(table, cfg, outdir, poses=table.poses() if fixed else None)


@pytest.mark.parametrize("decoder,fixed", [("voxel", False), ("fouriernet", False), ("voxel", True)])
def test_one_step_lowers_the_loss(sim, tmp_path, decoder, fixed):
    table = load_particles(sim / "particles.star")
    # Adam's first step moves every parameter by about its learning rate whatever the gradient's
    # size; these rates keep that step a descent step (checked for seeds 0-5).
    cfg = TrainConfig(decoder=decoder, fouriernet_width=32, encoder_width=0.125, batch_size=16,
                      lr_decoder=1e-3, lr_encoder=1e-5, tensorboard=False, normalize_samples=200,
                      ab_initio="encoder")
    trainer = _trainer(table, cfg, tmp_path, fixed)
    batch = next(iter(make_loader(trainer.dataset, 16, shuffle=True, seed=0)))
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    before = trainer.train_step(batch)  # the loss before the step
    after = trainer.train_step(batch)  # the loss after one step
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before
    moved = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, start[k])}
    assert any(k.startswith("decoder.") for k in moved)
    if decoder == "fouriernet":  # (a zero voxel grid gives the encoder no gradient at first)
        assert any(k.startswith("encoder.") for k in moved)


def _fsc05(volume_path: Path, truth_path: Path) -> float:
    vol, voxel = read_volume(volume_path)
    truth, _ = read_volume(truth_path)
    assert voxel == pytest.approx(PIXEL_A)
    return fsc_report(vol, truth, PIXEL_A)["resolution_px_0.5"]


def test_fixed_poses_voxel_reconstruction(sim, tmp_path):
    out = tmp_path / "vox"
    rc = cryoai_main(["train", str(sim / "particles.star"), "--poses", str(sim / "particles.star"),
                      "--outdir", str(out), "--max-epochs", "1", *FAST])
    assert rc == 0
    assert _fsc05(out / "volume.mrc", sim / "ground_truth.mrc") <= 2.5
    rec = _stage_record(out, "reconstruction")
    assert not rec["contrast_inverted"] and rec["map_density_skewness"] > 0.5


def _stage_record(run: Path, stage: str) -> dict:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("stage") == stage][-1]


def test_inverted_contrast_is_said(sim, tmp_path, capsys):
    """Images of the other contrast sign make a negative map: the run says so (never silently)."""
    out = tmp_path / "inverted"
    rc = cryoai_main(["train", str(sim / "particles.star"), "--poses", str(sim / "particles.star"),
                      "--outdir", str(out), "--max-epochs", "0.1", "--invert-contrast", *FAST])
    assert rc == 0
    err = capsys.readouterr().err
    assert "contrast looks inverted" in err and "without --invert-contrast" in err
    rec = _stage_record(out, "reconstruction")
    assert rec["contrast_inverted"] and rec["map_density_skewness"] < -0.5


def test_inverted_contrast_is_handled_by_the_search(sim, tmp_path, capsys):
    """In the default run, dark-protein images (here: white ones read with --invert-contrast)
    make the search's map negative: the run says so naming the file, goes on with the images
    inverted, and hands over a positive map, with the flag that reads the data right recorded
    for predict-poses."""
    out = tmp_path / "dark"
    rc = cryoai_main(["train", str(sim / "particles.star"), "--outdir", str(out), "--max-epochs", "0.1",
                      "--invert-contrast", *FAST])
    assert rc == 0
    err = capsys.readouterr().err
    assert "contrast looks inverted" in err and "particles.star" in err
    assert "goes on as without --invert-contrast" in err
    rec = _stage_record(out, "reconstruction")
    assert not rec["contrast_inverted"] and rec["map_density_skewness"] > 0.5
    assert "invert_contrast: false" in (out / "config.yaml").read_text()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["invert_contrast"] is False
    # The map and poses are right (aligned to the truth: an ab initio map has its own frame).
    assert cryoai_main(["evaluate", "--map", str(out / "volume.mrc"),
                        "--gt-map", str(sim / "ground_truth.mrc"), "--poses", str(out / "poses.star"),
                        "--gt-poses", str(sim / "particles.star"), "--outdir", str(out / "eval")]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["resolution_px_0.5"] <= 4.0 and metrics["rotation_error_deg_median"] < 10


@pytest.mark.parametrize("wiener,bar_px", [(True, 2.5), (False, 3.0)])
def test_fixed_poses_fouriernet_reconstruction(sim, tmp_path, wiener, bar_px):
    """FourierNet with known poses: started from the regularised reconstruction (fitted by
    regression, the default) it must reach 2.5 px; trained from images alone (2 epochs) 3.0 px
    (2.5 px for seeds 0-3; the bar leaves room for numerical differences between platforms)."""
    out = tmp_path / "fn"
    rc = cryoai_main(["train", str(sim / "particles.star"), "--poses", str(sim / "particles.star"),
                      "--outdir", str(out), "--max-epochs", "2", "--decoder", "fouriernet",
                      "--fouriernet-width", "32", "--lr-decoder", "3e-3", "--wiener-fit-steps", "600",
                      "--wiener-init" if wiener else "--no-wiener-init", *FAST])
    assert rc == 0
    assert _fsc05(out / "volume.mrc", sim / "ground_truth.mrc") <= bar_px
    log = (out / "train_log.jsonl").read_text()
    assert ('"decoder_fit_relative_error"' in log) == wiener


# ------------------------------------------------------------------ train / predict-poses CLI
def test_train_ab_initio_outputs(abinitio_run, no_pose_star):
    out = abinitio_run
    for name in ("volume.mrc", "poses.star", "poses.cs", "config.yaml", "checkpoint.pt"):
        assert (out / name).is_file(), name
    # poses.cs holds the same particles and poses as poses.star (for cryoSPARC).
    star, cs = load_particles(out / "poses.star"), load_particles(out / "poses.cs")
    np.testing.assert_array_equal(cs.stack_indices, star.stack_indices)
    np.testing.assert_allclose(cs.rotations, star.rotations, atol=2e-6)
    np.testing.assert_allclose(cs.shifts_a, star.shifts_a, atol=1e-4)
    info = read_header(out / "volume.mrc")
    vol, voxel = read_volume(out / "volume.mrc")
    assert vol.shape == (N, N, N) and np.isfinite(vol).all()
    assert voxel == pytest.approx(PIXEL_A), info

    src = starfile.read(no_pose_star, always_dict=True)["particles"]
    poses = starfile.read(out / "poses.star", always_dict=True)["particles"]
    assert len(poses) == len(src) == N_PARTICLES
    assert set(src.columns) <= set(poses.columns)
    assert set(ANGLES) <= set(poses.columns)
    np.testing.assert_array_equal(poses["rlnRandomSubset"], src["rlnRandomSubset"])
    assert [Path(n.split("@")[1]).name for n in poses["rlnImageName"]] == \
        [Path(n.split("@")[1]).name for n in src["rlnImageName"]]
    assert np.isfinite(poses[ANGLES].to_numpy()).all()
    table = load_particles(out / "poses.star")
    assert table.has_poses and len(table) == N_PARTICLES

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["encoder_width"] == 0.125 and cfg["batch_size"] == 16
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] == math.ceil(0.1 * math.ceil(N_PARTICLES / 16))


def test_train_resume_continues(abinitio_run, no_pose_star, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(abinitio_run, out)
    step0 = load_checkpoint(out / "checkpoint.pt")["state"]["step"]
    # No model flags: the saved config must be used (a default-width encoder would not load).
    rc = cryoai_main(["train", str(no_pose_star), "--outdir", str(out), "--resume",
                      "--max-epochs", "0.2", *FAST])
    assert rc == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] > step0
    assert ckpt["config"]["encoder_width"] == 0.125 and ckpt["config"]["batch_size"] == 16
    assert ckpt["config"]["max_epochs"] == 0.2
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["encoder_width"] == 0.125 and cfg["max_epochs"] == 0.2


def test_train_refuses_to_reuse_outdir(abinitio_run, no_pose_star, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in abinitio_run.iterdir()}
    rc = cryoai_main(["train", str(no_pose_star), "--outdir", str(abinitio_run), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--force" in err and "--resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in abinitio_run.iterdir()} == before


def test_predict_poses_writes_every_particle(abinitio_run, no_pose_star, tmp_path):
    out = tmp_path / "pred.star"
    rc = cryoai_main(["predict-poses", str(abinitio_run / "checkpoint.pt"), str(no_pose_star),
                      "--out", str(out), "--batch-size", "100", "--quiet", "--device", "cpu"])
    assert rc == 0
    pred = starfile.read(out, always_dict=True)["particles"]
    assert len(pred) == N_PARTICLES
    assert set(ANGLES) <= set(pred.columns)
    # Same model, same particles: the poses of the training run's poses.star.
    mine = load_particles(out).rotations
    theirs = load_particles(abinitio_run / "poses.star").rotations
    np.testing.assert_allclose(mine, theirs, atol=1e-4)


# ----------------------------------------------------------------------------- checkpoints
class Payload:
    """An arbitrary object: pickling it stores a reference to code."""

    def __init__(self):
        self.value = 42


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ok.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {"decoder": "voxel"}})
    ckpt = load_checkpoint(path)
    torch.testing.assert_close(ckpt["model"]["w"], torch.ones(3))
    assert "cryoai_version" in ckpt


def test_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "extra": Payload()}, path)
    with pytest.raises(InputError, match="evil.pt"):
        load_checkpoint(path)


def test_epoch_batches_shards_and_resume():
    from cryoai.data.loader import EpochBatches

    full = list(EpochBatches(103, 10, seed=5))
    assert len(full) == 11 and sorted(i for b in full for i in b) == list(range(103))
    assert full != list(EpochBatches(103, 10, seed=6))
    # the same permutation as torch's default (int64) randperm
    ref = torch.randperm(103, generator=torch.Generator().manual_seed(5)).tolist()
    assert [i for b in full for i in b] == ref
    assert list(EpochBatches(103, 10, seed=5, start=4)) == full[4:]
    shards = [list(EpochBatches(103, 10, seed=5, rank=r, world_size=3)) for r in range(3)]
    for b, batch in enumerate(full):
        assert sorted(i for s in shards for i in s[b]) == sorted(batch)
    ordered = [list(EpochBatches(25, 10, seed=None, rank=r, world_size=2)) for r in range(2)]
    assert ordered[0] == [[0, 2, 4, 6, 8], [10, 12, 14, 16, 18], [20, 22, 24]]
    assert ordered[1][2] == [21, 23]


def test_max_minutes_bounds_the_search(sim, tmp_path, capsys):
    """--max-minutes reaches into the search: a limit shorter than the search's EM cuts it
    short (and says so), and the run still ends with a map and a pose for every particle."""
    out = tmp_path / "limited"
    rc = cryoai_main(["train", str(sim / "particles.star"), "--outdir", str(out), "--max-minutes", "0.005",
                      "--search-iterations", "50", "--search-batch", "100", "--no-tensorboard",
                      "--device", "cpu"])
    assert rc == 0
    said = capsys.readouterr()
    assert "time limit (--max-minutes) reached: EM stopped after" in said.out + said.err
    rec = _stage_record(out, "search")
    assert rec["time_limit_reached"] and rec["search_seconds"] < 60
    assert len(load_particles(out / "poses.star")) == N_PARTICLES
    assert (out / "volume.mrc").is_file()


def test_a_new_run_starts_its_logs_afresh_and_a_resumed_one_appends(tmp_path):
    """``train --force`` in an old run's directory must not append to the old run's logs (the
    report would plot both runs as one)."""
    from cryoai.training.run_dir import FSC_LOG, TRAIN_LOG, RunDirectory

    for name in (TRAIN_LOG, FSC_LOG):
        (tmp_path / name).write_text('{"step": 1}\n')
    RunDirectory(tmp_path).log({"step": 2})  # resumed (the default): appended
    assert len((tmp_path / TRAIN_LOG).read_text().splitlines()) == 2
    run = RunDirectory(tmp_path, fresh=True)
    assert not (tmp_path / TRAIN_LOG).exists() and not (tmp_path / FSC_LOG).exists()
    run.log({"step": 1})
    assert (tmp_path / TRAIN_LOG).read_text().splitlines() == ['{"step": 1}']
