"""The noise model (background spectra, whitening) and the particles' scores and junk calls."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cryoai.data.dataset import ParticleBatch, ParticleDataset, ParticleSubset
from cryoai.data.noise import (
    background_mask,
    background_power,
    estimate_noise_model,
    ring_interpolate,
    whiten_images,
)
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.poses import Poses
from cryoai.physics.projection import sample_volume, slice_coords
from cryoai.physics.rotations import random_rotations
from cryoai.policy import Policy
from cryoai.reconstruction.particle_scores import ParticleScores, classify_junk, score_particles

N = 32
#: The junk call's policy (its threshold and core), from the one source.
_JUNK = {"threshold": Policy().junk_threshold, "core_share": Policy().junk_core_share}


def coloured_noise(n_images: int, n: int, low_gain: float, width_px: float, seed: int) -> tuple:
    """White noise of unit variance filtered by ``1 + low_gain exp(-r^2 / 2 w^2)``; returns the
    images and the true ring spectrum (R,) of the filtered noise.
    """
    gen = torch.Generator().manual_seed(seed)
    white = torch.randn(n_images, n, n, generator=gen, dtype=torch.float64)
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    r = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    gain = 1 + low_gain * torch.exp(-(r**2) / (2 * width_px**2))
    images = torch.fft.ifft2(torch.fft.fft2(white) * gain).real.float()
    rings = torch.arange(n // 2 + 1, dtype=torch.float64)
    return images, ((1 + low_gain * torch.exp(-(rings**2) / (2 * width_px**2))) ** 2).float()


def test_background_power_of_white_noise_is_its_variance():
    gen = torch.Generator().manual_seed(1)
    images = 1.7 * torch.randn(3000, N, N, generator=gen)
    power = background_power(images, background_mask(N, 0.3 * N)).mean(0)
    # Every ring but the lowest (the mean removed within the mask leaks into ring 1) is 1.7^2.
    np.testing.assert_allclose(power[2:].numpy(), 1.7**2, rtol=0.06)


def test_noise_model_recovers_a_coloured_spectrum_and_whitens_it():
    images, true_rings = coloured_noise(3000, N, low_gain=2.0, width_px=5.0, seed=2)
    model = estimate_noise_model(lambda idx: images[torch.from_numpy(idx)], len(images), N, 0.3 * N)
    assert model.groups == 1 and model.kind == "global"
    # The background mask smooths the spectrum by its own transform (about a ring): compare
    # beyond the lowest rings, and the colour (low over high power) as a whole.
    np.testing.assert_allclose(model.radial_power[0, 3:].numpy(), true_rings[3:].numpy(), rtol=0.12)
    assert model.colour() > 3.0
    white = whiten_images(images[:2000], model.radial_filter(np.arange(2000)))
    power = background_power(white, background_mask(N, 0.3 * N)).mean(0)
    np.testing.assert_allclose(power[3:].numpy(), 1.0, rtol=0.12)
    assert 0.9 < float(white.std()) < 1.1


def test_groups_get_their_own_levels_and_small_groups_shrink_to_the_global_one():
    gen = torch.Generator().manual_seed(3)
    n_img = 400
    groups = np.repeat([0, 1, 2], [190, 190, 20])
    level = torch.tensor([1.0, 3.0, 3.0])[torch.from_numpy(groups)]
    images = torch.randn(n_img, N, N, generator=gen) * level.sqrt()[:, None, None]
    model = estimate_noise_model(lambda idx: images[torch.from_numpy(idx)], n_img, N, 0.3 * N,
                                 groups=groups, per_group=48, shrink_images=16.0)
    levels = model.radial_power[:, 2:].mean(1).numpy()
    assert model.groups == 3 and model.kind == "micrograph"
    # Group 0 (variance 1) and 1 (variance 3), each pulled a little towards the mean level.
    assert 1.0 < levels[0] < 1.5 and 2.5 < levels[1] < 3.0
    # Group 2 has 20 images measured (of 48 wanted): pulled more than group 1.
    assert levels[2] < levels[1]


def test_whitened_images_and_whitened_ctf_describe_the_same_model():
    """A noise-free image ``C P`` read whitened has the spectrum ``(C W) P``: the filter is the
    same function of radius in the dataset's images and in the formation's CTF.
    """
    formation = ImageFormation(N, 4.0)
    gen = torch.Generator().manual_seed(4)
    vol = torch.randn(N, N, N, generator=gen, dtype=torch.complex64)
    rot = random_rotations(3, generator=gen)
    slices = sample_volume(vol, slice_coords(rot, formation.coords_px))
    batch = ParticleBatch(images=torch.zeros(3, N, N), index=torch.arange(3),
                          pixel_size_a=torch.full((3,), 4.0), defocus_u_a=torch.full((3,), 15000.0),
                          defocus_v_a=torch.full((3,), 14000.0), defocus_angle_rad=torch.zeros(3),
                          voltage_kv=torch.full((3,), 300.0), cs_mm=torch.full((3,), 2.7),
                          amplitude_contrast=torch.full((3,), 0.1), phase_shift_rad=torch.zeros(3),
                          bfactor_a2=torch.zeros(3))
    ctf = formation.ctf(batch)
    images = formation.low_pass_images(ctf * slices, N)
    filt = 1.0 / torch.linspace(0.5, 2.0, N // 2 + 1).repeat(3, 1)
    batch.whitening = filt
    whitened = formation.spectra(whiten_images(images, filt))
    expected = formation.ctf(batch) * slices
    inside = (formation.radius_px > 0) & (formation.radius_px < N // 2 - 2)  # (a real image's DC is real)
    torch.testing.assert_close(whitened[:, inside], expected[:, inside], rtol=1e-3, atol=1e-4)
    # ... and the whitening did something (the filter spans 0.5-2).
    assert float((whitened - formation.spectra(images)).abs().max()) > 0.1 * float(whitened.abs().max())


def test_ring_interpolate_is_linear_between_rings():
    radial = torch.tensor([[0.0, 1.0, 4.0, 9.0]])
    r = torch.tensor([0.0, 0.5, 2.25, 3.0, 7.0])
    np.testing.assert_allclose(ring_interpolate(radial, r)[0].numpy(), [0.0, 0.5, 5.25, 9.0, 9.0])


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    from cryoai.cli.main import main as cli

    out = tmp_path_factory.mktemp("noise") / "sim"
    assert cli(["simulate", "--box", str(N), "--n", "300", "--snr-db", "-6", "--seed", "3",
                "--outdir", str(out), "--quiet", "--device", "cpu", "--micrographs",
                "--particles-per-micrograph", "60", "--noise-colour", "0.5"]) == 0
    return out


def test_micrograph_names_are_read_and_the_run_whitens_per_micrograph(noisy_set):
    table = load_particles(noisy_set / "particles.star")
    assert table.micrograph_ids is not None and len(np.unique(table.micrograph_ids)) >= 3
    dataset = ParticleDataset(table)
    from cryoai.data.noise import measure_noise

    dataset.noise = measure_noise(dataset, "micrograph", 0.45 * N)
    assert dataset.noise.groups == len(np.unique(table.micrograph_ids))
    assert dataset.noise.colour() > 1.5  # --noise-colour 0.5: low frequencies hold more power
    batch = dataset.read(np.arange(8))
    assert batch.whitening.shape == (8, N // 2 + 1)
    subset = ParticleSubset(dataset, np.array([5, 7, 9]))
    assert len(subset) == 3 and subset.read([1, 2]).index.tolist() == [7, 9]


def test_scores_of_particles_and_of_empty_ice():
    formation = ImageFormation(N, 4.0)
    gen = torch.Generator().manual_seed(5)
    n_real, n_empty = 300, 200
    n = n_real + n_empty
    vol = torch.randn(N, N, N, generator=gen, dtype=torch.complex64)
    inside = formation.radius_px <= 8
    rot = random_rotations(n, generator=gen)
    proj = sample_volume(vol, slice_coords(rot, formation.coords_px))
    scale = 0.6 / float(proj[:, inside].abs().mean())
    vol, proj = vol * scale, proj * scale
    noise = torch.complex(torch.randn(n, len(inside), generator=gen),
                          torch.randn(n, len(inside), generator=gen)) / np.sqrt(2)
    y = noise.clone()
    y[:n_real] += 1.3 * proj[:n_real]
    ctf = torch.ones(n, len(inside))

    class _Spectra:
        device = torch.device("cpu")

        def __init__(self):
            self.formation = formation

        def __len__(self):
            return n

        def batches(self, indices):
            yield indices, y[indices], ctf[indices]

    poses = Poses(rot, torch.zeros(n, 2))
    scores = score_particles(_Spectra(), vol, poses, 8.0)
    # Empty ice: the matched filter's noise (N(0, 1)), amplitude about 0; particles: 1.3.
    assert abs(float(np.mean(scores.score[n_real:]))) < 0.3
    assert 0.8 < float(np.std(scores.score[n_real:])) < 1.2
    assert np.median(scores.amplitude[:n_real]) == pytest.approx(1.3, abs=0.05)
    assert float(np.median(scores.score[:n_real])) > 10
    # The residual excess of both is noise alone: about N(0, 1).
    assert abs(float(np.median(scores.residual_excess))) < 0.3
    decision = classify_junk(scores, **_JUNK)
    called = ~decision.keep
    assert called[n_real:].mean() > 0.95 and called[:n_real].mean() < 0.03

    # The residual's power outside a 12 px disk: noise alone there gives about N(0, 1) (its mean
    # and sd measured on simulated noise); a blob beside 40 of the particles (a neighbour, 16 px
    # from the centre) stands out, and the call with this third feature takes them as junk.
    yy, xx = torch.meshgrid(torch.arange(N) - N // 2, torch.arange(N) - N // 2, indexing="ij")
    blob = torch.exp(-((yy - 11.0) ** 2 + (xx - 11.0) ** 2) / (2 * 2.0**2))
    blob_spectrum = formation.spectra(blob[None])[0]
    blob_spectrum[~inside] = 0
    blob_spectrum *= 1.0 * float(proj[0, inside].abs().norm()) / float(blob_spectrum.abs().norm())
    y[:40] += blob_spectrum
    outer = score_particles(_Spectra(), vol, poses, 8.0, outer_radius_px=12.0)
    clean = outer.outer_excess[40:]
    assert abs(float(np.mean(clean))) < 0.3 and 0.7 < float(np.std(clean)) < 1.3
    assert np.median(outer.outer_excess[:40]) > max(4.0, 1.5 * np.median(outer.residual_excess[:40]))
    with_outer = classify_junk(outer, **_JUNK)
    assert (~with_outer.keep[:40]).mean() > 0.9
    assert with_outer.keep[40:n_real].mean() > 0.96 and (~with_outer.keep[n_real:]).mean() > 0.95
    # Without the third feature the blob hides in the whole residual's power more often.
    without = classify_junk(replace(outer, outer_excess=None), **_JUNK)
    assert (~without.keep[:40]).mean() < (~with_outer.keep[:40]).mean()


def test_classify_junk_finds_the_particles_cluster_with_half_junk():
    rng = np.random.default_rng(6)
    n_real, p_norm = 500, 15.0
    # Particles: amplitude = their micrograph's scale (0.7 or 1.4) plus noise of sd 1/||p||,
    # residual ~N(0, 1); junk (500): empty ice (amplitude ~0), broken particles (0.6 of the
    # scale), overlapping ones (the scale, residual +8).
    groups = np.repeat([0, 1], [250, 250])
    junk_groups = rng.integers(0, 2, 500)
    scale = np.where(np.concatenate([groups, junk_groups]) == 0, 0.7, 1.4)
    shape = np.concatenate([np.ones(n_real), np.zeros(200), np.full(150, 0.6), np.ones(150)])
    amplitude = scale * shape + rng.standard_normal(1000) / p_norm
    excess = np.concatenate([rng.standard_normal(n_real + 350), 8 + rng.standard_normal(150)])
    scores = ParticleScores(score=amplitude * p_norm, amplitude=amplitude, residual_excess=excess,
                            radius_px=8.0, projection_norm=np.full(1000, p_norm))
    decision = classify_junk(scores, np.concatenate([groups, junk_groups]), **_JUNK)
    called = ~decision.keep
    recall, precision = called[n_real:].mean(), called[n_real:].sum() / called.sum()
    assert recall > 0.9 and precision > 0.9
    # Without the per-micrograph amplitude, the two scales would split the particles.
    assert decision.keep[:n_real].mean() > 0.95
    # One micrograph's scale for all: the other's particles are 0.7 / (1/15) = 10 sd away.
    merged = classify_junk(scores, None, **_JUNK)
    assert merged.keep[:n_real].mean() < 0.75


def test_more_training_never_makes_the_map_worse(tmp_path):
    """``train --poses`` on a small noisy set (1,000 particles, 32 px, -10 dB): 40 epochs end
    with a map no worse against the truth than 2 epochs (keep-best, the default), where without
    keep-best the same 40 epochs drift from the regularised start and lose resolution.
    """
    from cryoai.cli.main import main as cli
    from cryoai.evaluation.metrics import fsc_report
    from cryoai.io import read_volume

    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", str(N), "--n", "1000", "--snr-db", "-10", "--seed", "1",
                "--outdir", str(sim), "--quiet", "--device", "cpu"]) == 0
    truth, _ = read_volume(sim / "ground_truth.mrc")
    star = str(sim / "particles.star")
    res = {}
    for name, flags in {"2": ["--max-epochs", "2"], "40": ["--max-epochs", "40"],
                        "40-no-keep-best": ["--max-epochs", "40", "--no-keep-best"]}.items():
        out = tmp_path / name
        assert cli(["train", star, "--poses", star, "--outdir", str(out), "--quiet", "--no-tensorboard",
                    "--device", "cpu", "--pose-encoder", "off", *flags]) == 0
        volume, pixel_a = read_volume(out / "volume.mrc")
        res[name] = fsc_report(volume, truth, pixel_a)["resolution_px_0.5"]
    assert res["40"] <= res["2"] * 1.01
    assert res["40-no-keep-best"] > res["2"] * 1.03  # the drift keep-best guards against


def test_noise_free_images_are_not_whitened():
    from cryoai.data.noise import NoiseFree

    gen = torch.Generator().manual_seed(7)
    r = torch.linspace(-1, 1, N)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) < 0.3).float()
    images = torch.randn(50, N, N, generator=gen) * disk  # signal inside, nothing on the background
    with pytest.raises(NoiseFree):
        estimate_noise_model(lambda idx: images[torch.from_numpy(idx)], 50, N, 0.3 * N)
    # A little noise (3% of the power on the background) under a strong signal: still far
    # above any real particle's signal energy, so taken for noise-free.
    faint = images + 0.1 * torch.randn(50, N, N, generator=gen)
    with pytest.raises(NoiseFree, match="signal energy"):
        estimate_noise_model(lambda idx: faint[torch.from_numpy(idx)], 50, N, 0.3 * N)
    noisy = images + 3.0 * torch.randn(50, N, N, generator=gen)
    assert estimate_noise_model(lambda idx: noisy[torch.from_numpy(idx)], 50, N, 0.3 * N).groups == 1


def _short_search_run(tmp_path, *flags: str):
    """A short default run (search, no encoder) on 300 simulated images with ``flags``; returns
    the run directory and its train_log.jsonl records.
    """
    import json

    from cryoai.cli.main import main as cli

    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", str(N), "--n", "300", "--snr-db", "-5", "--seed", "2",
                "--outdir", str(sim), "--quiet", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet", "--no-tensorboard",
                "--device", "cpu", "--pose-encoder", "off", "--search-iterations", "15",
                "--refine-rounds", "2", "--decoder-epochs", "0.2", *flags]) == 0
    return run, [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_search_that_explains_too_little_is_run_again_and_the_run_warns(tmp_path):
    """With a bar no map can pass (--min-explained 5), the search runs 1 + --search-retries times
    from different seeds (the retries from class averages) and the run ends with a warning naming
    the share explained; poses.star carries the junk stage's columns.
    """
    import json

    import starfile

    run, log = _short_search_run(tmp_path, "--min-explained", "5", "--search-retries", "1")
    attempts = [r for r in log if r.get("stage") == "search"]
    assert [r["attempt"] for r in attempts] == [1, 2] and attempts[0]["seed"] != attempts[1]["seed"]
    # --search-start auto: a retry after a failed search starts from 2D class averages
    assert attempts[1]["start"] == "classes", attempts
    assert all(0 < r["explained_signal"] < 5 for r in attempts)
    outputs = json.loads((run / "outputs.json").read_text())
    assert any("the ab initio search failed 2 time(s)" in w for w in outputs["warnings"])
    assert outputs["search_explained_signal"] == max(r["explained_signal"] for r in attempts)
    table = starfile.read(run / "poses.star", always_dict=True)["particles"]
    assert {"rlnClassNumber", "rlnCryoaiScore", "rlnCryoaiJunkDistance"} <= set(table.columns)


@pytest.mark.parametrize("explained, attempts_run, kept, doubtful", [
    # every attempt doubtful: the best kept, and said (as in the next test's second case)
    pytest.param([0.70, 0.75, 0.72], 3, 0.75, True, marks=pytest.mark.slow),
    ([0.70, 0.90, 0.72], 2, 0.90, False),  # a retry that converged ends the search
])
def test_a_doubtful_search_from_class_averages_is_run_again(tmp_path, monkeypatch, explained, attempts_run,
                                                             kept, doubtful):
    """A search from class averages whose map explains less than DOUBTFUL_EXPLAINED_FROM_CLASSES
    (0.82) of the signal (though more than --min-explained) runs again from another seed; the best
    is kept, and if it is still doubtful the run warns, saying how far the attempts' poses agree.
    (The share explained is set here: what is tested is the flow.)
    """
    import json

    from cryoai.pipeline import search as search_module

    assert Policy().doubtful_explained_from_classes == 0.82
    shares = iter(explained)
    monkeypatch.setattr(search_module, "explained_share", lambda particles, found, radius_px: next(shares))
    run, log = _short_search_run(tmp_path, "--search-start", "classes", "--search-retries", "2")
    attempts = [r for r in log if r.get("stage") == "search"]
    assert len(attempts) == attempts_run and all(r["start"] == "classes" for r in attempts)
    assert len({r["seed"] for r in attempts}) == attempts_run
    done = next(r for r in log if r.get("stage") == "search_done")
    outputs = json.loads((run / "outputs.json").read_text())
    assert done["explained_signal"] == kept == outputs["search_explained_signal"]
    said = [w for w in outputs.get("warnings", []) if "class averages is doubtful" in w]
    assert bool(said) == doubtful
    if doubtful:
        # the attempts' agreement: a share of the particles, stated in the warning
        assert 0 <= done["attempts_agreement"] <= 1
        assert f"{done['attempts_agreement']:.0%} of the particles alike" in said[0]
        assert "of 3 attempt(s) explains 75%" in said[0]
    else:
        assert done["attempts_agreement"] is None


@pytest.mark.parametrize("explained, attempts_run, kept, kept_attempt", [
    # the class averages' searches doubtful: the blob's kept (slow, 50 s: the decision is tested on
    # records in tests/pipeline/test_decisions.py, the retry flow end to end by the test above)
    pytest.param([0.86, 0.78, 0.74], 3, 0.86, 1, marks=pytest.mark.slow),
    # they explain more than the blob's: the best of them kept (the decision itself is tested on
    # records in tests/pipeline/test_decisions.py; this is the same flow end to end)
    pytest.param([0.72, 0.78, 0.74], 3, 0.78, 2, marks=pytest.mark.slow),
    # one converged from class averages: kept (it poses the rare views); the flow as before
    pytest.param([0.86, 0.85], 2, 0.85, 2, marks=pytest.mark.slow),
])
def test_a_blob_search_with_preferred_views_is_kept_over_doubtful_class_averages(
        tmp_path, monkeypatch, explained, attempts_run, kept, kept_attempt):
    """A blob's search whose views come out preferred runs again from class averages; if those
    searches stay doubtful and explain less than the blob's, the blob's is kept (said in the log)
    and the run does not warn that the search from class averages is doubtful. (The views' SCF*
    and the shares explained are set here: what is tested is which attempt is kept.)
    """
    import json

    from cryoai.pipeline import search as search_module

    shares = iter(explained)
    monkeypatch.setattr(search_module, "explained_share", lambda particles, found, radius_px: next(shares))
    monkeypatch.setattr(search_module, "sampling_compensation_factor", lambda rotations: 0.3)
    run, log = _short_search_run(tmp_path, "--search-start", "auto", "--search-retries", "2",
                                 "--no-balance-views")
    attempts = [r for r in log if r.get("stage") == "search"]
    assert [r["start"] for r in attempts] == ["blob"] + ["classes"] * (attempts_run - 1), attempts
    done = next(r for r in log if r.get("stage") == "search_done")
    assert done["explained_signal"] == kept and done["kept_attempt"] == kept_attempt
    outputs = json.loads((run / "outputs.json").read_text())
    doubtful = [w for w in outputs.get("warnings", []) if "class averages is doubtful" in w]
    assert bool(doubtful) == (kept_attempt > 1 and kept < 0.82)
    if doubtful:  # said with the attempts' agreement, the blob's among them
        assert 0 <= done["attempts_agreement"] <= 1
        assert f"{done['attempts_agreement']:.0%} of the particles alike" in doubtful[0]
        assert f"of {attempts_run} attempt(s) explains {kept:.0%}" in doubtful[0]
    else:
        assert done["attempts_agreement"] is None
    # the class averages are written only when the kept map was searched from them
    assert (run / "class_averages.mrcs").exists() == (kept_attempt > 1)
    if kept_attempt == 1:  # the report names the attempt kept and its start
        from cryoai.cli.main import main as cli

        assert cli(["report", str(run)]) == 0
        said = json.loads((run / "report" / "report.json").read_text())
        assert said["search_kept"] == f"attempt 1 of {attempts_run} (blob)", said
