"""The amortized pose stage: the encoder's inputs and labels, the hypotheses' scores, the
assignment against a map (with an oracle encoder, so that the machinery is tested apart from
learning), the confidence threshold, and the stage in a default run with predict-poses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.evaluation.metrics import align_rotations
from cryoai.io import load_particles
from cryoai.models.encoder import PoseGridEncoder
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.fft import fft3_c, fourier_crop_2d
from cryoai.physics.projection import sample_volume, slice_coords
from cryoai.physics.rotations import geodesic_distance, random_rotations, so3_grid
from cryoai.physics.shifts import phase_shift
from cryoai.reconstruction import AssignSettings, ParticleSpectra, PoseAssigner, em
from cryoai.training.checkpoint import load_checkpoint
from cryoai.training.encoder_fit import background_noise_variance, soft_labels


def test_low_pass_images_equal_the_fourier_crop():
    gen = torch.Generator().manual_seed(0)
    formation = ImageFormation(32, 3.0)
    images = torch.randn(4, 32, 32, generator=gen)
    torch.testing.assert_close(formation.low_pass_images(formation.spectra(images), 20),
                               fourier_crop_2d(images, 20), atol=1e-5, rtol=1e-4)


def test_score_hypotheses_ranks_like_the_explicit_squared_error():
    gen = torch.Generator().manual_seed(1)
    formation = ImageFormation(16, 2.0)
    m = formation.coords_px.shape[0]
    y = torch.randn(3, m, dtype=torch.complex64, generator=gen)
    c = torch.rand(3, m, generator=gen)
    data = em.SearchData.in_band(formation, y, c, 6.0)
    p = data.spectra.shape[1]
    proj = torch.randn(3, 5, p, dtype=torch.complex64, generator=gen)
    shifts = torch.randn(3, 4, 2, generator=gen)
    got = em.score_hypotheses(data, proj, shifts)  # (B, S, K)
    for b in range(3):
        phases = phase_shift(data.freqs_px, shifts[b])  # (S, P)
        pred = data.ctf[b] * phases[:, None, :] * proj[b][None]  # (S, K, P)
        err = ((data.spectra[b] - pred).abs() ** 2 * data.weight).sum(-1)
        own = ((data.spectra[b].abs() ** 2) * data.weight).sum()
        torch.testing.assert_close(got[b], err - own, atol=1e-3, rtol=1e-4)


def test_soft_labels_peak_at_the_nearest_grid_rotation():
    encoder = PoseGridEncoder(16, n_rotations=576)
    rot = random_rotations(5, generator=torch.Generator().manual_seed(2))
    labels = soft_labels(rot, encoder.grid, math.radians(10))
    torch.testing.assert_close(labels.sum(-1), torch.ones(5))
    nearest = geodesic_distance(encoder.grid[None], rot[:, None]).argmin(-1)
    assert torch.equal(labels.argmax(-1), nearest)


def test_background_noise_variance_measures_white_noise_and_not_the_particle():
    formation = ImageFormation(64, 2.0)
    gen = torch.Generator().manual_seed(3)
    r = torch.linspace(-1, 1, 64).abs()
    blob = torch.exp(-((r[:, None] ** 2 + r[None] ** 2) / 0.05))  # a particle in the middle
    clean = blob.expand(50, 64, 64)
    noisy = clean + 0.7 * torch.randn(50, 64, 64, generator=gen)
    assert background_noise_variance(formation, formation.spectra(clean)) < 1e-4
    assert background_noise_variance(formation, formation.spectra(noisy)) == pytest.approx(0.49, rel=0.05)


class _OracleEncoder(PoseGridEncoder):
    """An encoder that "knows" the poses: its logits peak at the grid rotation nearest to each
    particle's true rotation (set before the call), with a given probability mass."""

    def __init__(self, truth: torch.Tensor, sure: torch.Tensor):
        super().__init__(16, n_rotations=4608)
        self.truth, self.sure = truth, sure

    def forward(self, images):
        logits = torch.full((len(images), len(self.grid)), -30.0)
        near = geodesic_distance(self.grid[None], self.truth[:, None]).argmin(-1)
        wrong = torch.randint(0, len(self.grid), (len(images),), generator=torch.Generator().manual_seed(0))
        logits[torch.arange(len(images)), torch.where(self.sure, near, wrong)] = 30.0
        logits[~self.sure] = 0.0  # an unsure encoder: flat
        return logits


@pytest.fixture(scope="module")
def noise_free_set():
    """Noise-free particles of a random map (L=32) at known poses, as spectra."""
    gen = torch.Generator().manual_seed(4)
    n, b = 32, 60
    formation = ImageFormation(n, 4.0)
    g = torch.linspace(-1, 1, n)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    volume = sum(torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) / 0.02)
                 for cx, cy, cz in torch.rand(6, 3, generator=gen) * 0.8 - 0.4)
    fvol = fft3_c(volume) / n
    rot = random_rotations(b, generator=gen)
    shifts = (torch.rand(b, 2, generator=gen) - 0.5) * 4  # px
    ctf = torch.ones(b, formation.coords_px.shape[0])
    spectra = sample_volume(fvol, slice_coords(rot, formation.coords_px))
    spectra = spectra * phase_shift(formation.freqs_px, shifts)
    return formation, fvol, spectra, ctf, rot, shifts


def test_amortized_assignment_from_right_hypotheses_finds_the_poses(noise_free_set):
    formation, fvol, spectra, ctf, rot, shifts = noise_free_set
    settings = AssignSettings(radius_px=8, max_shift_px=3, shift_step_px=1, hypotheses=4)
    encoder = _OracleEncoder(rot, torch.ones(len(rot), dtype=torch.bool))
    assigner = PoseAssigner(formation, fvol, settings, encoder)
    got_rot, got_shifts = assigner.assign(spectra, ctf)
    angle = torch.rad2deg(geodesic_distance(got_rot, rot))
    assert float(angle.median()) < 2.0, float(angle.median())
    assert float((got_shifts - shifts).norm(dim=-1).median()) < 0.3
    assert assigner.counts == {"amortized": len(rot), "global": 0}


def test_pruned_search_keeping_every_rotation_is_the_exhaustive_search(noise_free_set):
    """With every rotation kept, the second pass scores the whole grid over the full shifts: the
    exhaustive search's argmin, whatever the coarse pass said."""
    formation, fvol, spectra, ctf, _, _ = noise_free_set
    grid, radius, shifts = so3_grid(576), 8.0, em.shift_grid(3, 1)
    proj = sample_volume(fvol, slice_coords(grid, formation.coords_px[formation.band(radius)]))
    rot_x, sh_x = em.assign_global(formation, fvol, spectra, ctf, radius, grid, shifts, projections=proj)
    everything = em.PrunedGrid.make(formation, fvol, grid, 4.0, 3, 2, keep=len(grid))
    rot_p, sh_p = em.assign_pruned(formation, spectra, ctf, radius, grid, shifts, proj, everything)
    same = (geodesic_distance(rot_p, rot_x) < 1e-4) & ((sh_p - sh_x).norm(dim=-1) < 1e-6)
    assert float(same.float().mean()) >= 0.95, float(same.float().mean())


def test_pruned_search_finds_what_the_exhaustive_search_finds(noise_free_set):
    """The default pruning (a band of 0.7x, shifts 1/0.7 further apart, 64 of 4,608 rotations kept)
    on noise-free particles: the same first guess as the exhaustive search, near the truth."""
    formation, fvol, spectra, ctf, rot, _ = noise_free_set
    settings = AssignSettings(radius_px=8, max_shift_px=3, shift_step_px=1, refine_rounds=0)
    pruned = PoseAssigner(formation, fvol, settings)
    assert pruned.pruned is not None and pruned.pruned.keep == 64
    exhaustive = PoseAssigner(formation, fvol, AssignSettings(**{**settings.__dict__, "prune_keep": 0}))
    assert exhaustive.pruned is None
    rot_p, _ = pruned.assign(spectra, ctf)
    rot_x, _ = exhaustive.assign(spectra, ctf)
    assert float((geodesic_distance(rot_p, rot_x) < 1e-4).float().mean()) >= 0.9
    assert float(torch.rad2deg(geodesic_distance(rot_p, rot)).median()) < 10  # the grid's spacing


def test_newton_rounds_refine_in_a_band_rising_with_the_rounds(noise_free_set):
    formation, fvol, _, _, _, _ = noise_free_set
    assigner = PoseAssigner(formation, fvol, AssignSettings(radius_px=8, refine_rounds=4))
    radii = [assigner.refine_radius_px(k, 12.0) for k in range(4)]
    assert radii[0] == pytest.approx(0.8 * 8) and radii[-1] == pytest.approx(12.0)
    assert all(b > a for a, b in zip(radii, radii[1:], strict=False))
    old = PoseAssigner(formation, fvol, AssignSettings(radius_px=8, refine_rounds=4, refine_method="random"))
    assert [old.refine_radius_px(k, 12.0) for k in range(4)] == pytest.approx([9, 10, 11, 12])


def test_unsure_particles_get_the_global_search(noise_free_set):
    formation, fvol, spectra, ctf, rot, _ = noise_free_set
    settings = AssignSettings(radius_px=8, max_shift_px=3, shift_step_px=1, hypotheses=4)
    sure = torch.arange(len(rot)) % 3 != 0
    encoder = _OracleEncoder(rot, sure)
    # Without a threshold the unsure third keeps a wrong first guess; with one, it is searched.
    blind = PoseAssigner(formation, fvol, settings, encoder)
    angle = torch.rad2deg(geodesic_distance(blind.assign(spectra, ctf)[0], rot))
    assert float(angle[~sure].median()) > 20
    careful = PoseAssigner(formation, fvol, settings, encoder, min_confidence=0.5)
    angle = torch.rad2deg(geodesic_distance(careful.assign(spectra, ctf)[0], rot))
    assert float(angle.median()) < 2.0 and float(angle[~sure].median()) < 3.0
    assert careful.counts == {"amortized": int(sure.sum()), "global": int((~sure).sum())}


def test_default_run_trains_checks_and_saves_the_encoder_for_predict_poses(tmp_path):
    """L=32, noise-free, --pose-encoder always (50 particles could not pay for its training
    under auto): the encoder stage runs after the search of a subset, is checked against the
    search's poses on held-out particles, the other particles are posed by it, and predict-poses
    uses the saved encoder (for every particle with --first-guess encoder)."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "300", "--no-noise", "--shift-sigma-a", "10",
                "--seed", "3", "--outdir", str(sim), "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
                "--search-iterations", "80", "--search-batch", "200", "--search-subset", "250",
                "--refine-rounds", "4", "--decoder-epochs", "1", "--encoder-minutes", "0.15",
                "--pose-encoder", "always", "--no-tensorboard"]) == 0
    records = {r["stage"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
               if "stage" in r}
    plan = records["search_plan"]  # said: the subset (capped), the schedule a blob's start runs
    assert (plan["particles"], plan["subset"], plan["batch"], plan["iterations"]) == (300, 250, 200, 80)
    assert plan["start"] == "a blob" and (plan["band_start_px"], plan["band_end_px"]) == (5.0, 10.0)
    enc, assign = records["encoder"], records["assignment"]
    assert enc["images"] > 0 and enc["check_particles"] == 25
    assert 0 <= enc["check_hypothesis_hit_rate"] <= 1 and enc["check_global_agreement"] > 0.5
    assert assign["particles"] == 50 and assign["amortized"] + assign["global"] == 50
    assert assign["mode"] == ("amortized" if enc["check_used"] else "global")
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["pose_encoder"]["check"]["used"] == enc["check_used"]
    # predict-poses with the encoder for every particle: the machinery end to end (the accuracy
    # of an encoder trained for seconds is not the point here; the oracle tests above are).
    out = tmp_path / "predicted.star"
    assert cli(["predict-poses", str(run / "checkpoint.pt"), str(sim / "particles.star"), "--out", str(out),
                "--first-guess", "encoder", "--quiet"]) == 0
    predicted = load_particles(out)
    assert len(predicted) == 300 and np.isfinite(predicted.rotations).all()
    # The global first guess against the run's map agrees with the run's own poses (the run's
    # choice, --pose-encoder always, is this seconds-trained encoder for every particle).
    out2 = tmp_path / "predicted2.star"
    assert cli(["predict-poses", str(run / "checkpoint.pt"), str(sim / "particles.star"), "--out", str(out2),
                "--first-guess", "global", "--quiet"]) == 0
    ours = torch.as_tensor(load_particles(run / "poses.star").rotations)
    theirs = torch.as_tensor(load_particles(out2).rotations)
    # ... and the run converged (40 search iterations did not: poses agreeing on a wrong map
    # would prove nothing).
    truth = load_particles(sim / "particles.star").rotations
    assert float(np.median(align_rotations(ours.numpy(), truth)["angle_deg"])) < 10
    assert float(torch.rad2deg(geodesic_distance(ours, theirs)).median()) < 6.0


def test_the_encoder_is_not_trained_where_it_cannot_pay_for_its_training(tmp_path):
    """--pose-encoder auto: 20 particles outside the subset cannot save the encoder's training
    time (its cost model, timed on the machine before training): no encoder, and the run says why."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "24", "--n", "60", "--snr-db", "0", "--outdir", str(sim),
                "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
                "--search-iterations", "5", "--search-batch", "20", "--search-subset", "40",
                "--refine-rounds", "1", "--decoder-epochs", "0.1", "--no-tensorboard"]) == 0
    records = {r["stage"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
               if "stage" in r}
    enc = records["encoder"]
    assert enc["trained"] is False and enc["global_first_guess_images_per_s"] > 0
    said = (run / "run.log").read_text()
    assert "encoder: not trained: the global search gives the 20 other particles" in said
    assert "pose_encoder" not in load_checkpoint(run / "checkpoint.pt")
    assert records["assignment"]["global"] == 20


def test_predict_poses_refuses_first_guess_encoder_without_one(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "24", "--n", "40", "--snr-db", "0", "--outdir", str(sim),
                "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet",
                "--search-iterations", "5", "--search-batch", "20", "--refine-rounds", "1",
                "--decoder-epochs", "0.1", "--pose-encoder", "off", "--no-tensorboard"]) == 0
    assert "pose_encoder" not in load_checkpoint(run / "checkpoint.pt")
    rc = cli(["predict-poses", str(run / "checkpoint.pt"), str(sim / "particles.star"),
              "--out", str(tmp_path / "x.star"), "--first-guess", "encoder", "--quiet"])
    assert rc != 0 and not (tmp_path / "x.star").exists()


def test_dataset_spectra_feed_the_encoder(tmp_path):
    """The encoder's images of real particles come from their spectra (no second read)."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "8", "--snr-db", "0", "--outdir", str(sim), "--quiet"]) == 0
    table = load_particles(sim / "particles.star")
    formation = ImageFormation(32, table.median_pixel_size_a())
    particles = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
    y, c = particles.read(np.arange(8))
    from cryoai.reconstruction.amortized import encoder_images

    images = encoder_images(formation, y, c, PoseGridEncoder(24, n_rotations=576, band_px=9.0))
    assert images.shape == (8, 24, 24) and torch.isfinite(images).all()


class _SignalGrowingWithArea:
    """A stand-in noise model: the images' whitened signal energy grows as the band's area
    beyond 10 px by ``growth`` (1: as the area; 0: no signal beyond 10 px).
    """

    def __init__(self, energy_within_10px: float, growth: float = 1.0):
        self.energy_within_10px, self.growth = energy_within_10px, growth

    def information(self, radius_px: float) -> float:
        return self.energy_within_10px * (1 + self.growth * ((radius_px / 10) ** 2 - 1))


def _first_guess_band(cfg, box_px, noise):
    from cryoai.pipeline.decisions import first_guess_band

    return first_guess_band(cfg.assign_radius_px, cfg.search_radius_end, cfg.assign_refine_radius_frac,
                            box_px, noise, cfg.policy)


def test_first_guess_band_follows_the_images_signal():
    from dataclasses import replace

    from cryoai.physics.grids import max_paired_radius_px
    from cryoai.pipeline.settings import assignment_settings
    from cryoai.training.config import TrainConfig

    cfg = TrainConfig()
    policy = cfg.policy
    wide = round(cfg.assign_refine_radius_frac * max_paired_radius_px(64), 2)
    band, figures = _first_guess_band(cfg, 64, _SignalGrowingWithArea(93.0))
    assert band == wide == figures["first_guess_band_px"] and wide > cfg.search_radius_end
    assert figures["energy_in_search_band"] == 93.0 and figures["energy_in_wide_band"] > 93.0
    # Enough signal within the search's band: that band, as before.
    band, figures = _first_guess_band(cfg, 64, _SignalGrowingWithArea(policy.wide_first_guess_energy + 1))
    assert band is None and figures["first_guess_band_px"] == cfg.search_radius_end
    # A wider band that adds little signal (a tenth of the energy, as a CFTR-sized map at 3 A
    # under structural noise): the search's band; at the border's gain, the wider one.
    band, figures = _first_guess_band(cfg, 64, _SignalGrowingWithArea(93.0, growth=0.1))
    assert band is None and figures["first_guess_band_px"] == cfg.search_radius_end
    assert figures["energy_in_wide_band"] < policy.wide_band_min_gain * 93.0
    border = (policy.wide_band_min_gain - 1) / ((wide / 10) ** 2 - 1) + 1e-6
    assert _first_guess_band(cfg, 64, _SignalGrowingWithArea(93.0, growth=border))[0] == wide
    # A small box whose refinement band is narrower than the search's: never narrowed.
    assert _first_guess_band(cfg, 32, _SignalGrowingWithArea(93.0))[0] is None
    # Noise-free images (no noise model), or a band given: nothing chosen.
    assert _first_guess_band(cfg, 64, None) == (None, None)
    given = replace(cfg, assign_radius_px=12.0)
    assert _first_guess_band(given, 64, _SignalGrowingWithArea(93.0)) == (12.0, None)
    assert assignment_settings(given, 64).radius_px == 12.0
    assert assignment_settings(cfg, 64).radius_px == cfg.search_radius_end
    # The policy moves the border: with a lower energy threshold, 93 is enough for the search's band.
    lower = replace(cfg, policy=replace(policy, wide_first_guess_energy=90.0))
    assert _first_guess_band(lower, 64, _SignalGrowingWithArea(93.0))[0] is None


def test_a_run_on_weak_images_guesses_poses_in_the_wider_band_and_says_so(tmp_path, capsys):
    from dataclasses import replace

    from cryoai.data.dataset import ParticleDataset
    from cryoai.pipeline import check_inputs
    from cryoai.pipeline.records import Particles
    from cryoai.pipeline.stages import first_guess_stage, noise_stage
    from cryoai.training.config import TrainConfig

    policy = TrainConfig().policy
    # The embedded 70S map at 6 A per pixel: its signal reaches beyond 10 px, so the wider band
    # adds to it (at 5 A it holds little beyond 12 px: see below).
    bands, said = {}, []
    for snr_db, pixel_a in ((-16, 6), (-4, 6), (-16, 5)):
        sim = tmp_path / f"sim{snr_db}_{pixel_a}"
        assert cli(["simulate", "--box", "64", "--n", "300", "--snr-db", str(snr_db), "--seed", "4",
                    "--pixel-size", str(pixel_a), "--outdir", str(sim), "--quiet", "--device", "cpu"]) == 0
        table = load_particles(sim / "particles.star")
        cfg = TrainConfig()
        dataset = ParticleDataset(table, scale=check_inputs(table, cfg))
        particles = Particles(table, dataset, None, torch.device("cpu"))
        particles = replace(particles, dataset=dataset.variant(noise=noise_stage(particles, cfg).noise))
        chosen, record = first_guess_stage(particles, cfg)
        bands[snr_db, pixel_a] = (chosen.assign_radius_px, record.figures)
        said += record.said
    weak, strong, flat = bands[-16, 6], bands[-4, 6], bands[-16, 5]
    border = policy.wide_first_guess_energy
    assert weak[1]["energy_in_search_band"] < border < strong[1]["energy_in_search_band"]
    assert weak[1]["energy_in_wide_band"] >= policy.wide_band_min_gain * weak[1]["energy_in_search_band"]
    assert weak[0] == weak[1]["wide_band_px"] > 10  # kept in the run's options, for predict-poses
    assert strong[0] is None
    # Weak images whose wider band adds little signal: the search's band, said.
    assert flat[1]["energy_in_search_band"] < policy.wide_first_guess_energy
    assert flat[1]["energy_in_wide_band"] < policy.wide_band_min_gain * flat[1]["energy_in_search_band"]
    assert flat[0] is None
    assert any("first guessed within 13.95 px" in line for line in said)
    assert any("band adds little to it" in line for line in said)
