"""``cryoai report``: a self-contained HTML page with the run's curves, FSC, map, sky map,
error histograms and config; rendered in headless Chromium where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_util import run_fails, run_ok
from cryoai.cli.main import main
from cryoai.evaluation.metrics import align_shifts
from cryoai.evaluation.plots import viewing_directions
from cryoai.io import read_volume, write_volume
from cryoai.physics.rotations import euler_zyz_to_matrix, random_rotations

FIGURES = ("isosurface.png", "curves.png", "fsc.png", "map.png", "class_001.png", "class_001_isosurface.png",
           "class_002.png", "class_002_isosurface.png", "viewing_directions.png", "rotation_errors.png",
           "shift_errors.png", "times.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short ab initio (encoder) run with half maps and two 3D classes added: every section of
    the report."""
    root = tmp_path_factory.mktemp("report")
    sim, run = root / "sim", root / "run"
    assert main(["simulate", "--box", "32", "--n", "64", "--seed", "5", "--snr-db", "0",
                 "--device", "cpu", "--quiet", "--outdir", str(sim)]) == 0
    assert main(["train", str(sim / "particles.star"), "--outdir", str(run), "--ab-initio", "encoder",
                 "--max-epochs", "2", "--batch-size", "8", "--encoder-width", "0.125", "--log-every", "1",
                 "--device", "cpu", "--quiet", "--no-tensorboard"]) == 0
    truth, apix = read_volume(sim / "ground_truth.mrc")
    rng = np.random.default_rng(0)
    for k in (1, 2):
        noisy = truth + 0.3 * truth.std() * rng.normal(size=truth.shape)
        write_volume(run / f"volume_half{k}.mrc", noisy.astype(np.float32), apix)
    # Two 3D classes as --classes 2 writes them: the truth, and the truth turned upside down.
    import json

    outputs = json.loads((run / "outputs.json").read_text())
    outputs["classes"] = []
    for k, class_map in ((1, truth), (2, truth[::-1].copy())):
        write_volume(run / f"volume_class{k:03d}.mrc", class_map.astype(np.float32), apix)
        outputs["classes"].append({"class": k, "map": f"volume_class{k:03d}.mrc",
                                   "particles": 40 - 16 * (k - 1), "junk_called": k, "resolution_a": 8.0 + k})
    (run / "outputs.json").write_text(json.dumps(outputs))
    return root


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    """The report of the run, with the ground truth."""
    sim, run = run_dir / "sim", run_dir / "run"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(["report", str(run), "--gt-map", str(sim / "ground_truth.mrc"),
                   "--gt-poses", str(sim / "particles.star")])
    assert rc == 0
    path = run / "report" / "report.html"
    assert f"report: {path}" in out.getvalue()
    return path


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    for title in ("Summary", "Map: isosurface", "Training curves", "Fourier shell correlation", "Map",
                  "3D class 1", "3D class 2: isosurface", "Viewing directions", "Rotation errors",
                  "Shift errors", "Configuration"):
        assert f"<h2>{title}</h2>" in page, title
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "batch_size: 8" in page  # the run's config
    assert "rotation error deg median" in page and "half map fsc 0.143 px" in page
    summary = page.split('id="summary"')[1].split("</table>")[0]
    assert "Resolution" in summary and " A (half maps, FSC = 0.143)" in summary
    assert "Against the ground truth" in summary and 'id="warnings"' in page
    assert "<h2>Map in 3D</h2>" in page and "Plotly.newPlot" in page and "https://" not in page.split(
        "<h2>Map in 3D</h2>")[1][:200]
    # The 3D view's menu picks the map or a class.
    assert page.count('"type":"isosurface"') == 3 and '"label":"3D class 2"' in page
    cxc = (report.parent.parent / "volume.cxc").read_text()
    assert "open volume.mrc" in cxc and "level" in cxc
    for name in FIGURES:
        data = (report.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_report_half_map_resolution_is_measured(report):
    import json

    metrics = json.loads((report.parent / "report.json").read_text())
    # Half maps = truth + noise at 30% of its std: well correlated at low frequency, not at
    # Nyquist for every voxel; the 0.143 crossing must be a real number within (2, 16) px.
    assert 2.0 <= metrics["half_map_fsc_0.143_px"] < 16.0
    assert metrics["resolution_px_0.5"] > 2.0  # a one-epoch encoder run is not at Nyquist


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_fails(capsys, tmp_path, "report", tmp_path / "empty", names=("empty", "volume.mrc"))


def test_report_with_poses_of_another_set(run_dir, tmp_path, capsys):
    root = tmp_path / "c"
    shutil.copytree(run_dir, root)
    other = root / "other"
    run_ok(capsys, "simulate", "--box", "32", "--n", "10", "--no-noise", "--device", "cpu", "--quiet",
           "--outdir", other)
    run_fails(capsys, root, "report", root / "run", "--outdir", root / "run" / "report",
              "--gt-poses", other / "particles.star", names=("particles.star", "10 particles"))


def test_viewing_directions_are_relion_rot_and_tilt():
    angles_deg = np.array([[30.0, 50.0, 10.0], [-120.0, 160.0, 70.0], [75.0, 90.0, -45.0]])
    rot = euler_zyz_to_matrix(torch.as_tensor(np.deg2rad(angles_deg))).numpy()
    az, el = viewing_directions(rot)
    np.testing.assert_allclose(np.rad2deg(az), angles_deg[:, 0], atol=1e-9)
    np.testing.assert_allclose(np.rad2deg(el), 90.0 - angles_deg[:, 1], atol=1e-9)


def test_align_shifts_removes_a_global_translation():
    rng = np.random.default_rng(1)
    rot = random_rotations(500, generator=torch.Generator().manual_seed(2)).double().numpy()
    true = rng.normal(scale=10, size=(500, 2))
    t = np.array([3.0, -4.0, 2.5])
    moved = true - np.einsum("nji,j->ni", rot, t)[:, :2]  # the in-plane part of R^T t
    noise = rng.normal(scale=0.1, size=(500, 2))
    t_fit, err = align_shifts(moved + noise, true, rot)
    np.testing.assert_allclose(t_fit, t, atol=0.05)
    assert np.median(err) < 0.2
    assert np.median(np.linalg.norm(moved - true, axis=1)) > 3  # the raw error is large


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=20000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    # The page's own script marks whether every image decoded (naturalWidth > 0).
    assert 'data-images-ok="true"' in body.group(0), body.group(0)
    assert f'data-image-count="{len(FIGURES)}"' in body.group(0)
    # The 3D view (plotly, WebGL) drew its canvas.
    assert 'data-view3d="ok"' in body.group(0), body.group(0)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1000,2000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1000)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_isosurface_views_draw_the_surface_at_its_level(tmp_path):
    """A sphere's isosurface: drawn (gold pixels) at a level inside the map's range, and said to
    be absent above its maximum."""
    import matplotlib.image

    from cryoai.evaluation.plots import plot_isosurface_views

    g = np.arange(32) - 16.0
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    sphere = np.exp(-(r / 6.0) ** 2)
    gold = []
    for level in (0.5, 2.0):
        plot_isosurface_views(sphere, level, tmp_path / "iso.png", title="sphere", voxel_a=2.0)
        rgb = matplotlib.image.imread(tmp_path / "iso.png")[..., :3]
        gold.append(float(((rgb[..., 0] - rgb[..., 2]) > 0.15).mean()))  # red well above blue
    assert gold[0] > 0.05 and gold[1] == 0.0


def test_the_3d_view_opens_at_three_sd_of_the_solvent():
    from cryoai.evaluation.view3d import DEFAULT_SIGMA, map_levels

    rng = np.random.default_rng(0)
    volume = rng.normal(0.5, 2.0, size=(32, 32, 32))  # solvent: mean 0.5, sd 2
    volume[12:20, 12:20, 12:20] += 50.0  # a molecule in the middle does not move the level
    levels, default = map_levels(volume)
    assert default == pytest.approx(0.5 + DEFAULT_SIGMA * 2.0, abs=0.2)
    assert levels == sorted(levels) and default in levels
