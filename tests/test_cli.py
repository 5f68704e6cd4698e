"""The ``cryoai`` command line, run in-process: help and version, a simulate -> info ->
downsample -> fsc round trip, and bad inputs (one-line error naming the file, non-zero exit,
no traceback, nothing written or overwritten)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

import cryoai
from _cli_util import run_fails, run_ok, smooth_volume, write_map
from cryoai.cli.main import COMMANDS, main
from cryoai.io import ImageSource, load_particles
from cryoai.physics.fft import fourier_crop_2d

N_PARTICLES = 20


@pytest.fixture(scope="module")
def sim_set(tmp_path_factory) -> Path:
    """A simulated set (20 particles, 32 px, 10 A) written by ``cryoai simulate``; read only."""
    out = tmp_path_factory.mktemp("cli") / "sim"
    rc = main(["simulate", "--box", "32", "--n", str(N_PARTICLES), "--shift-sigma-a", "10",
               "--seed", "2", "--device", "cpu", "--quiet", "--outdir", str(out)])
    assert rc == 0
    return out


@pytest.fixture
def sim_copy(sim_set, tmp_path) -> Path:
    """A private copy of the simulated set (its STAR refers to its stack relatively)."""
    return Path(shutil.copytree(sim_set, tmp_path / "sim"))


# -- help and version ---------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cryoai {cryoai.__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cryoai{'' if command is None else ' ' + command}"), out[:200]


# -- the round trip ------------------------------------------------------------------------------

def test_simulate_info_downsample_fsc(capsys, tmp_path):
    sim = tmp_path / "sim"
    out = run_ok(capsys, "simulate", "--box", "32", "--n", N_PARTICLES, "--shift-sigma-a", "10",
                 "--device", "cpu", "--quiet", "--outdir", sim)
    assert f"wrote {N_PARTICLES} particles (32 px, 10.000 A" in out
    star = sim / "particles.star"

    info = run_ok(capsys, "info", star)
    fields = dict(line.split(":", 1) for line in info.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["particles"] == f"{N_PARTICLES} in 1 stack(s)"
    assert fields["box"] == "32 px"
    assert fields["pixel size"] == "10.0000 A"
    assert fields["poses"] == "yes" and fields["shifts"] == "yes"
    assert fields["voltage"] == "300.0 kV"
    assert "all references resolve" in run_ok(capsys, "info", star, "--check-images")

    small = tmp_path / "small" / "particles.star"
    run_ok(capsys, "downsample", star, "--box", "16", "--out", small, "--chunk-size", "7",
           "--quiet")
    big_table = load_particles(star)
    small_table = load_particles(small)
    assert len(small_table) == N_PARTICLES and small_table.box_px == 16
    np.testing.assert_allclose(small_table.pixel_size_a, 20.0)
    np.testing.assert_allclose(small_table.rotations, big_table.rotations, atol=1e-6)
    np.testing.assert_allclose(small_table.shifts_a, big_table.shifts_a, atol=1e-4)
    np.testing.assert_allclose(small_table.defocus_u_a, big_table.defocus_u_a, rtol=1e-6)
    originals = ImageSource(big_table).read(np.arange(N_PARTICLES)).astype(np.float64)
    expected = fourier_crop_2d(torch.from_numpy(originals), 16).numpy()
    got = ImageSource(small_table).read(np.arange(N_PARTICLES))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert "16" in run_ok(capsys, "info", small, "--check-images").split("box:")[1].splitlines()[0]

    gt = sim / "ground_truth.mrc"
    png, js = tmp_path / "fsc.png", tmp_path / "fsc.json"
    out = run_ok(capsys, "fsc", gt, gt, "--plot", png, "--json", js)
    assert "FSC=0.5: 2.00 px = 20.00 A" in out
    assert "FSC=0.143: 2.00 px" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    report = json.loads(js.read_text())
    assert report["resolution_px"]["0.5"] == pytest.approx(2.0)
    assert np.allclose(report["fsc"], 1.0)


def test_fsc_finds_resolution_of_a_blurred_map(capsys, tmp_path):
    """A control for the round trip: a map against a low-passed copy is not 'Nyquist'."""
    n = 32
    v = np.random.default_rng(0).normal(size=(n, n, n))
    spec = np.fft.fftshift(np.fft.fftn(v))
    c = np.arange(n) - n // 2
    r = np.sqrt(sum(g**2 for g in np.meshgrid(c, c, c, indexing="ij")))
    blurred = np.fft.ifftn(np.fft.ifftshift(spec * (r <= 8))).real
    a, b = write_map(tmp_path / "a.mrc", v), write_map(tmp_path / "b.mrc", blurred)
    out = run_ok(capsys, "fsc", a, b)
    line = next(x for x in out.splitlines() if x.startswith("FSC=0.5:"))
    res_px = float(line.split()[1])
    assert 3.5 < res_px < 4.2, line  # the cut at shell 8 of 32: period 4 px


# -- bad inputs -----------------------------------------------------------------------------------

def simulate_args(tmp_path: Path, map_path: Path) -> list:
    return ["simulate", "--map", map_path, "--n", "4", "--device", "cpu", "--quiet",
            "--outdir", tmp_path / "out"]


def test_simulate_missing_map(capsys, tmp_path):
    run_fails(capsys, tmp_path, *simulate_args(tmp_path, tmp_path / "missing.mrc"),
              names=("missing.mrc", "not found"))


def test_simulate_truncated_map(capsys, tmp_path):
    path = write_map(tmp_path / "cut.mrc", smooth_volume(16))
    path.write_bytes(path.read_bytes()[:-1000])
    run_fails(capsys, tmp_path, *simulate_args(tmp_path, path), names=("cut.mrc", "truncated"))


def test_simulate_odd_box_map(capsys, tmp_path):
    path = write_map(tmp_path / "odd.mrc", smooth_volume(33))
    run_fails(capsys, tmp_path, *simulate_args(tmp_path, path), names=("odd.mrc", "odd"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_simulate_non_finite_map(capsys, tmp_path, bad):
    v = smooth_volume(16)
    v[3, 4, 5] = bad
    path = write_map(tmp_path / "bad.mrc", v)
    run_fails(capsys, tmp_path, *simulate_args(tmp_path, path), names=("bad.mrc", "NaN"))


def test_simulate_constant_map_with_noise(capsys, tmp_path):
    path = write_map(tmp_path / "flat.mrc", np.zeros((16, 16, 16)))
    run_fails(capsys, tmp_path, *simulate_args(tmp_path, path), names=("flat.mrc", "constant"))


@pytest.mark.parametrize("option,value", [("--chunk-size", "0"), ("--stack-size", "0"),
                                          ("--n", "0"), ("--snr-db", "nan"),
                                          ("--amplitude-contrast", "1.5")])
def test_simulate_bad_options(capsys, tmp_path, option, value):
    run_fails(capsys, tmp_path, "simulate", "--box", "16", option, value, "--device", "cpu",
              "--quiet", "--outdir", tmp_path / "out", names=(option,))


def test_simulate_refuses_previous_run(capsys, sim_copy):
    star_bytes = (sim_copy / "particles.star").read_bytes()
    run_fails(capsys, sim_copy.parent, "simulate", "--box", "16", "--n", "4", "--seed", "9",
              "--device", "cpu", "--quiet", "--outdir", sim_copy,
              names=(str(sim_copy), "--force"))
    assert (sim_copy / "particles.star").read_bytes() == star_bytes
    # --force overwrites it.
    run_ok(capsys, "simulate", "--box", "16", "--n", "4", "--seed", "9", "--device", "cpu",
           "--quiet", "--outdir", sim_copy, "--force")
    assert load_particles(sim_copy / "particles.star").box_px == 16


def test_info_star_without_image_names(capsys, tmp_path, sim_copy):
    star = sim_copy / "particles.star"
    text = star.read_text()
    assert "_rlnImageName" in text
    bad = tmp_path / "noimages.star"
    bad.write_text(text.replace("_rlnImageName", "_rlnMicrographName"))
    run_fails(capsys, tmp_path, "info", bad, names=("noimages.star", "rlnImageName"))


def _past_the_end(sim_copy: Path) -> Path:
    star = sim_copy / "particles.star"
    last = f"{N_PARTICLES:06d}@particles_000.mrcs"
    text = star.read_text()
    assert text.count(last) == 1
    bad = sim_copy / "past_end.star"
    bad.write_text(text.replace(last, f"{N_PARTICLES + 1:06d}@particles_000.mrcs"))
    return bad


def test_info_check_images_reference_past_the_end(capsys, tmp_path, sim_copy):
    bad = _past_the_end(sim_copy)
    run_fails(capsys, tmp_path, "info", bad, "--check-images",
              names=("particles_000.mrcs", str(N_PARTICLES + 1)))


def test_downsample_reference_past_the_end(capsys, tmp_path, sim_copy):
    bad = _past_the_end(sim_copy)
    run_fails(capsys, tmp_path, "downsample", bad, "--box", "16", "--quiet",
              "--out", tmp_path / "small" / "particles.star",
              names=("particles_000.mrcs", str(N_PARTICLES + 1)))


def test_downsample_stack_with_nan(capsys, tmp_path, sim_copy):
    stack = sim_copy / "particles_000.mrcs"
    with mrcfile.open(stack, mode="r+") as m:
        m.data[5, 3, 4] = np.nan
    run_fails(capsys, tmp_path, "downsample", sim_copy / "particles.star", "--box", "16",
              "--quiet", "--out", tmp_path / "small" / "particles.star",
              names=("particles_000.mrcs", "NaN"))
    # Also over an existing output with --force: the old output survives the failure.
    out = tmp_path / "old" / "particles.star"
    out.parent.mkdir()
    out.write_text("old\n")
    out.with_suffix(".mrcs").write_text("old stack\n")
    run_fails(capsys, tmp_path, "downsample", sim_copy / "particles.star", "--box", "16",
              "--quiet", "--force", "--out", out, names=("particles_000.mrcs", "NaN"))


@pytest.mark.parametrize("box", ["15", "64", "0"])
def test_downsample_bad_box(capsys, tmp_path, sim_copy, box):
    run_fails(capsys, tmp_path, "downsample", sim_copy / "particles.star", "--box", box,
              "--quiet", "--out", tmp_path / "small" / "particles.star", names=(f"--box {box}",))


def test_downsample_refuses_to_overwrite_its_input_stack(capsys, tmp_path, sim_copy):
    run_fails(capsys, tmp_path, "downsample", sim_copy / "particles.star", "--box", "16",
              "--quiet", "--force", "--out", sim_copy / "particles_000.star",
              names=("particles_000.mrcs",))


def test_fsc_different_boxes(capsys, tmp_path):
    a = write_map(tmp_path / "a16.mrc", smooth_volume(16))
    b = write_map(tmp_path / "b32.mrc", smooth_volume(32))
    run_fails(capsys, tmp_path, "fsc", a, b, names=("a16.mrc", "b32.mrc"))


def test_fsc_odd_box_and_missing_plot_folder(capsys, tmp_path):
    odd = write_map(tmp_path / "odd.mrc", smooth_volume(33))
    run_fails(capsys, tmp_path, "fsc", odd, odd, names=("odd.mrc", "odd"))
    a = write_map(tmp_path / "a.mrc", smooth_volume(16))
    run_fails(capsys, tmp_path, "fsc", a, a, "--plot", tmp_path / "nowhere" / "fsc.png",
              names=("nowhere",))


# -- closed pipes -------------------------------------------------------------------------------

class _ClosedPipe(io.TextIOBase):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_in_process(capsys, monkeypatch, sim_set):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    rc = main(["info", str(sim_set / "particles.star")])
    monkeypatch.undo()
    assert rc == 141  # 128 + SIGPIPE, as a tool killed by the signal
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("buffered", [True, False])
def test_broken_pipe_real_process(sim_set, buffered):
    """``cryoai info x.star | head -0``: the reader is gone before anything is written. With a
    buffered stdout the write happens only when the buffer is flushed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "cryoai.cli.main", "info",
                             str(sim_set / "particles.star")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    rc = proc.wait(timeout=120)
    assert err == "", err
    assert rc == 141
