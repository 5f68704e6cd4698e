"""Junk sorting's second look: real particles that look like junk at a wrong pose (misposed, or
picked off-centre beyond the search's shifts) are posed again against the kept particles' map
and kept; empty ice stays junk."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.data.noise import measure_noise
from cryoai.evaluation.metrics import align_rotations
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.masks import map_mask_radius_px
from cryoai.physics.poses import Poses
from cryoai.physics.rotations import random_rotations
from cryoai.pipeline.settings import assignment_settings, junk_settings
from cryoai.reconstruction import ParticleSpectra, reconstruct
from cryoai.reconstruction.junk_sorting import sort_junk
from cryoai.reconstruction.regularised import half_set_sums
from cryoai.training.config import TrainConfig

N = 32


def test_second_look_keeps_misposed_and_off_centre_particles(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", str(N), "--n", "800", "--snr-db", "-5", "--seed", "3",
                "--junk-fraction", "0.2", "--junk-mix", "empty=1", "--shift-tail-fraction", "0.15",
                "--outdir", str(sim), "--quiet", "--device", "cpu"]) == 0
    table = load_particles(sim / "particles.star")
    kind = pd.read_csv(sim / "truth.csv")["kind"].to_numpy()
    real, empty = kind == "particle", kind == "empty"
    dataset = ParticleDataset(table)
    mask_px = map_mask_radius_px(N, 0.45)
    dataset.noise = measure_noise(dataset, "micrograph", mask_px)
    particles = ParticleSpectra(dataset, ImageFormation(N, float(table.pixel_size_a[0])), torch.device("cpu"))
    settings = assignment_settings(TrainConfig(), N)

    # The poses a search would hand over: the truth, except that a tenth of the real particles
    # are misposed (random rotations), off-centre picks keep the shift the search's range
    # allows (its edge), and the empty images have random poses.
    gen = torch.Generator().manual_seed(0)
    rotations = torch.as_tensor(table.rotations).clone()
    shifts_a = torch.as_tensor(table.shifts_a).clone()
    rng = np.random.default_rng(0)
    misposed = real & (rng.random(len(table)) < 0.1)
    rotations[misposed | empty] = random_rotations(int((misposed | empty).sum()), generator=gen)
    limit_a = settings.max_shift_px * float(table.pixel_size_a[0])
    norm = shifts_a.norm(dim=1, keepdim=True)
    off_centre = real & (norm[:, 0].numpy() > 1.3 * limit_a)
    shifts_a = torch.where(norm > limit_a, shifts_a * limit_a / norm, shifts_a)
    shifts_a[empty] = 0
    wrong = misposed | off_centre
    assert wrong.sum() >= 80 and off_centre.sum() >= 25 and empty.sum() >= 120
    poses = Poses(rotations, shifts_a)
    rec = reconstruct(particles, poses, mask_radius_px=mask_px)

    kept = {}
    for passes in (0, 2):
        junk = replace(junk_settings(TrainConfig()), passes=passes)
        out = sort_junk(particles, poses, rec, groups=table.micrograph_ids, assign_settings=settings,
                        mask_radius_px=mask_px, settings=junk)
        kept[passes] = out.decision.keep
        if passes:
            # Given the sums the reconstruction was made from, the same sorting (one
            # back-projection of every particle fewer).
            given = sort_junk(particles, poses, rec, groups=table.micrograph_ids, assign_settings=settings,
                              mask_radius_px=mask_px, settings=junk,
                              sums=half_set_sums(particles, poses))
            assert np.array_equal(given.decision.keep, out.decision.keep)
            torch.testing.assert_close(given.poses.rotations, out.poses.rotations)
            torch.testing.assert_close(given.reconstruction.fourier_volume, out.reconstruction.fourier_volume,
                                       atol=1e-6, rtol=1e-4)
        assert (~out.decision.keep[empty]).mean() > 0.9, passes  # empty ice stays junk
        assert out.decision.keep[real & ~wrong].mean() > 0.95, passes
        if passes:
            assert out.reposed >= wrong.sum() * 0.7
            errors = align_rotations(out.poses.rotations.numpy()[real], table.rotations[real])["angle_deg"]
            assert np.median(errors[wrong[real]]) < 10  # posed right this time
            assert out.reconstruction.fourier_volume.shape == (N, N, N)
    assert poses.rotations[misposed].equal(rotations[misposed])  # the caller's poses untouched
    # Without the second look most of them are junk; with it most are kept.
    assert kept[0][wrong].mean() < 0.4 < 0.8 < kept[2][wrong].mean(), (kept[0][wrong].mean(),
                                                                       kept[2][wrong].mean())
