"""The search stage's machinery: reused buffers, the in-place E-step kernels, the deadline."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.pipeline.settings import assignment_settings, search_settings
from cryoai.reconstruction import (
    ParticleSpectra,
    PoseAssigner,
    assign_remaining,
    em,
    repose_subset,
    search_subset,
)
from cryoai.training.config import TrainConfig


def test_workspace_reuses_its_memory():
    ws = em.Workspace()
    a = ws.get("x", (10, 20))
    b = ws.get("x", (5, 4))  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (5, 4)
    c = ws.get("x", (30, 30))  # larger: a new buffer, kept from then on
    assert c.numel() == 900 and ws.get("x", (2, 2)).data_ptr() == c.data_ptr()
    assert ws.get("x", (2, 2), dtype=torch.float64).dtype == torch.float64


def test_score_grid_into_a_buffer_equals_the_allocating_call():
    gen = torch.Generator().manual_seed(0)
    formation = ImageFormation(16, 2.0)
    keep = formation.band(6.0)
    p = int(keep.sum())
    y = torch.randn(3, formation.coords_px.shape[0], dtype=torch.complex64, generator=gen)
    c = torch.rand(3, formation.coords_px.shape[0], generator=gen)
    data = em.SearchData.in_band(formation, y, c, 6.0)
    proj = torch.randn(7, p, dtype=torch.complex64, generator=gen)
    shifts = em.shift_grid(1.0, 1.0)
    buf = torch.full((3 * len(shifts) * 7 + 11,), float("nan"))
    into = em.score_grid(data, proj, shifts, out=buf)
    assert into.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(into, em.score_grid(data, proj, shifts))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert cli(["simulate", "--box", "24", "--n", "60", "--snr-db", "0", "--outdir", str(out),
                "--quiet", "--seed", "2"]) == 0
    table = load_particles(out / "particles.star", read_poses=False)
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    return ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))


def _search_poses(particles, settings, log, deadline=None):
    """The search's mechanisms in the default run's order: the subset searched and posed afresh
    against its map, then the other particles posed against it.
    """
    found = search_subset(particles, settings, log=log, deadline=deadline)
    assigner = PoseAssigner(particles.formation, found.fourier_volume, assignment_settings(TrainConfig(), 24))
    return assign_remaining(particles, repose_subset(found, assigner), assigner, log=log)


def test_search_stops_at_its_deadline_and_still_poses_every_particle(small_set):
    settings = replace(search_settings(TrainConfig(), 24), mask_radius_px=10.8, subset=40, n_rotations=576,
                       iterations=30, batch=20, stop_posterior=2.0, refine_rounds=4, refine_candidates=8)
    lines: list[str] = []
    t0 = time.perf_counter()
    poses = _search_poses(small_set, settings, lines.append, deadline=time.perf_counter())
    late = time.perf_counter() - t0
    said = [line for line in lines if "time limit" in line]
    assert len(said) == 1 and "EM stopped after 1 iterations" in said[0]
    assert len(poses) == 60 and torch.isfinite(poses.rotations).all()
    det = torch.linalg.det(poses.rotations.double())
    torch.testing.assert_close(det, torch.ones_like(det), rtol=0, atol=1e-5)
    # Without a deadline the same search runs every EM iteration (the limit is what cut it).
    lines.clear()
    t0 = time.perf_counter()
    _search_poses(small_set, settings, lines.append)
    full = time.perf_counter() - t0
    assert not [line for line in lines if "time limit" in line]
    assert any("EM 30/30" in line for line in lines)
    assert late < full


def test_posterior_kernel_keeps_the_best_pose_and_sums_to_one():
    gen = torch.Generator().manual_seed(1)
    errors = torch.rand(4, 1000, generator=gen) * 50
    best = errors.argmin(dim=-1)
    post = em.posterior_from_errors_(errors.clone(), 1.0)
    assert (post.argmax(dim=-1) == best).all()
    np.testing.assert_allclose(post.sum(-1).numpy(), 1.0, rtol=1e-5)
