"""The continuous latent model (``--latent-dim``): the EM at known poses finds the direction along
which the particles' maps change, says when there is none, and its outputs are read by the
field's readers (starfile, cryosparc-tools) and by ``cryoai analyze`` and ``cryoai evaluate``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from _cli_util import run_ok
from cryoai.io import load_particles, read_volume, write_volume
from test_simulate import correlation, simulate


@pytest.fixture(scope="module")
def two_conformations(tmp_path_factory):
    """The embedded ribosome at 32 px, and the same with one part of it (cut by a tilted plane)
    moved by 3 voxels: two conformations of one complex, a 1:1 mixture of 600 particles at 0 dB.
    Returns the folder (particles.star, truth.csv, ground_truth_state_00K.mrc)."""
    root = tmp_path_factory.mktemp("conformations")
    simulate(root / "one", "--n", "2", "--no-noise")
    ribosome, voxel = read_volume(root / "one" / "ground_truth.mrc")
    z, y, x = np.indices(ribosome.shape) - 16
    part = 0.8 * x + 0.5 * y + 0.3 * z > 4.0
    moved = np.where(part, 0.0, ribosome) + np.roll(np.where(part, ribosome, 0.0), 3, axis=2)
    write_volume(root / "a.mrc", ribosome.astype(np.float32), voxel)
    write_volume(root / "b.mrc", moved.astype(np.float32), voxel)
    simulate(root / "mix", "--map", str(root / "a.mrc"), str(root / "b.mrc"), "--n", "600", "--snr-db", "0",
             "--seed", "3")
    return root / "mix"


def _fit(folder, dim: int, band_px: float = 10.0, iterations: int = 12, deadline: float | None = None):
    from cryoai.data.dataset import ParticleDataset
    from cryoai.models.image_formation import ImageFormation
    from cryoai.reconstruction import ParticleSpectra
    from cryoai.reconstruction.latent import LatentSettings, fit_latent
    from cryoai.reconstruction.regularised import reconstruct

    table = load_particles(folder / "particles.star")
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    particles = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
    poses = table.poses()
    rec = reconstruct(particles, poses, mask_radius_px=14.0)
    model = fit_latent(particles, poses, np.arange(len(table)), rec.fourier_volume,
                       LatentSettings(dim=dim, band_px=band_px, iterations=iterations), deadline=deadline)
    return model, rec


def test_the_latent_model_separates_two_conformations_at_known_poses(two_conformations):
    model, rec = _fit(two_conformations, dim=2)
    states = pd.read_csv(two_conformations / "truth.csv")["state"].to_numpy()
    # z1, the direction along which the maps change most, is the conformation; z2, which the
    # data do not support, has lost its power (its posterior means stay near the prior's 0)
    assert abs(np.corrcoef(model.z[:, 0], states)[0, 1]) > 0.85
    assert model.variance[0] > 0.8 and model.variance[1] < 0.1
    # z in standard deviations of the spread (posterior included): mean 0, unit second moment
    assert abs(model.z[:, 0].mean()) < 1e-3
    np.testing.assert_allclose((model.z**2 + model.z_std**2).mean(0), 1.0, atol=0.02)
    # the map at each conformation's mean z is that conformation's, more than the other's
    truths = [read_volume(two_conformations / f"ground_truth_state_{k:03d}.mrc")[0] for k in (1, 2)]
    for k in (1, 2):
        made = model.volume(model.z[states == k].mean(0), rec.fourier_volume)
        own, other = correlation(made, truths[k - 1]), correlation(made, truths[2 - k])
        assert own > other + 0.01, (k, own, other)


def test_the_latent_fit_stops_at_its_deadline(two_conformations):
    import time

    model, _ = _fit(two_conformations, dim=1, deadline=time.perf_counter())  # (the run's --max-minutes)
    assert len(model.history) == 1 and np.isfinite(model.z).all()


def test_the_latent_model_says_when_the_particles_do_not_change(tmp_path):
    simulate(tmp_path / "one", "--n", "600", "--snr-db", "0", "--seed", "3")
    model, _ = _fit(tmp_path / "one", dim=2)
    from cryoai.policy import Policy

    assert (model.variance < Policy().latent_min_determined).all(), model.variance


def test_latent_run_writes_z_for_relion_and_cryosparc_and_analyze_shows_it(two_conformations, tmp_path,
                                                                            capsys):
    from cryosparc.dataset import Dataset

    run = tmp_path / "run"
    star = two_conformations / "particles.star"
    out = run_ok(capsys, "train", star, "--poses", star, "--latent-dim", "1", "--max-epochs", "0.02",
                 "--outdir", run, "--quiet")
    assert "latent model" in (run / "run.log").read_text()
    table = starfile.read(run / "poses.star")["particles"]
    states = pd.read_csv(two_conformations / "truth.csv")["state"].to_numpy()
    z = table["rlnCryoaiLatent1"].to_numpy()
    assert abs(np.corrcoef(z, states)[0, 1]) > 0.85
    cs = Dataset.load(run / "poses.cs")
    np.testing.assert_allclose(cs["components_mode_0/value"], z, atol=1e-4)
    assert (cs["components_mode_0/component"] == 0).all()
    # analyze: the plots, the maps along z1 and at the k-means centres, one page
    out = run_ok(capsys, "analyze", run, "--table", two_conformations / "truth.csv", "--color-by", "state",
                 "--kmeans", "2", "--steps", "4")
    analysis = run / "analyze"
    for name in ("latent.png", "latent_state.png", "pc1.png", "kmeans2.png", "analyze.html", "analyze.json"):
        assert (analysis / name).stat().st_size > 0, name
    series = [read_volume(analysis / "pc1" / f"map_{j:02d}.mrc")[0] for j in (1, 4)]
    truths = [read_volume(two_conformations / f"ground_truth_state_{k:03d}.mrc")[0] for k in (1, 2)]
    sign = np.sign(np.corrcoef(z, states)[0, 1])  # z1's sign is arbitrary: which end is which state
    first, last = (series if sign > 0 else series[::-1])
    assert correlation(first, truths[0]) - correlation(first, truths[1]) > 0.01
    assert correlation(last, truths[1]) - correlation(last, truths[0]) > 0.01
    # the run's report shows the latent space and the maps along z1
    run_ok(capsys, "report", run)
    page = (run / "report" / "report.html").read_text()
    assert "Latent space" in page and "Maps along z1" in page
    labels = np.loadtxt(analysis / "kmeans2" / "labels.txt").astype(int)
    agreement = max((labels == states).mean(), (labels == 3 - states).mean())
    assert agreement > 0.9
    # evaluate: each particle's own map fits its state better than the consensus map does
    state_maps = [two_conformations / f"ground_truth_state_{k:03d}.mrc" for k in (1, 2)]
    out = run_ok(capsys, "evaluate", "--map", run / "volume.mrc", "--latent", run / "latent.npz",
                 "--gt-states", two_conformations / "truth.csv", "--gt-state-maps", *state_maps,
                 "--latent-images", "20", "--outdir", tmp_path / "eval")
    assert "per-image FSC-AUC" in out
    import json

    latent = json.loads((tmp_path / "eval" / "metrics.json").read_text())["latent"]
    assert latent["fsc_auc_mean"] > latent["consensus_fsc_auc_mean"]


def test_analyze_says_what_is_missing(tmp_path, capsys):
    from _cli_util import run_fails

    (tmp_path / "run").mkdir()
    message = run_fails(capsys, tmp_path, "analyze", tmp_path / "run", names=("latent.npz", "--latent-dim"))
    assert "no latent model" in message
