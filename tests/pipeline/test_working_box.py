"""The search at a working box: the images Fourier-cropped as they are read, the map cropped to
match them, and a run that searches at a smaller box than its particles' and reconstructs at
the full box (``Policy.search_box_px``; docs/pipeline.md#working-box)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoai.cli.main import main as cli
from cryoai.data.cropped import FourierCroppedSource, cropped_fourier_volume, cropped_table
from cryoai.evaluation.metrics import align_rotations
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.fft import fft3_c
from cryoai.physics.grids import grid_2d, grid_3d
from cryoai.physics.projection import sample_volume, slice_coords
from cryoai.pipeline.decisions import working_box
from cryoai.policy import Policy


def _blobs(n: int) -> torch.Tensor:
    """A few Gaussian blobs off centre: a map with structure at every frequency of the crop."""
    g = grid_3d(n, dtype=torch.float64)  # (n, n, n, 3) as (x, y, z)
    out = torch.zeros((n,) * 3, dtype=torch.float64)
    for centre, sigma, amp in (((5.0, -3.0, 2.0), 2.5, 1.0), ((-6.0, 4.0, -1.0), 1.8, 0.7),
                               ((0.0, 7.0, 5.0), 3.0, 0.5)):
        d2 = ((g - torch.tensor(centre, dtype=torch.float64)) ** 2).sum(-1)
        out += amp * torch.exp(-d2 / (2 * sigma**2))
    return out


class _Images:
    """An image source over a stack in memory (``box``, ``read``, ``validate``)."""

    def __init__(self, images: np.ndarray):
        self.images, self.box = images, images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]

    def validate(self) -> None:
        pass


def test_cropped_images_are_projections_of_the_cropped_map():
    """The slice theorem across the crop: the spectra (``ImageFormation``, 1/box) of projections
    cropped from 48 to 24 px equal the central slices of the map's Fourier volume cropped by
    :func:`cropped_fourier_volume` (rotations that map the grid onto itself: no interpolation).
    """
    n, m = 48, 24
    volume = _blobs(n)
    rotations = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                              [[1, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]],
                             dtype=torch.float64)
    # Projections along the rotated z (image frame -> volume frame: x' = R x), summed exactly.
    fv = fft3_c(volume.to(torch.complex128)) / n  # the run's layout: fft3_c / N
    full = ImageFormation(n, 2.0).double()
    slices = sample_volume(fv, slice_coords(rotations, grid_2d(n, dtype=torch.float64)))
    images = torch.fft.ifftshift(torch.fft.ifft2(torch.fft.ifftshift(slices * n, dim=(-2, -1))),
                                 dim=(-2, -1)).real  # real projections with those slices as spectra
    source = FourierCroppedSource(_Images(images.numpy()), m)
    cropped = torch.from_numpy(source.read(np.arange(len(rotations)))).double()
    small = ImageFormation(m, 4.0).double()
    got = small.spectra(cropped)
    fv_small = cropped_fourier_volume(fv, m)
    coords = small.coords_px.double()
    want = sample_volume(fv_small, slice_coords(rotations, coords))
    inside = small.radius_px < m // 2 - 1
    err = (got - want)[:, inside].abs().pow(2).sum() / want[:, inside].abs().pow(2).sum()
    assert err.sqrt() < 1e-6, float(err.sqrt())
    # and the full box's own identity, so the test can fail for the crop alone
    direct = sample_volume(fv, slice_coords(rotations[:1], full.coords_px.double()))
    assert torch.allclose(full.spectra(images[:1]), direct, atol=1e-8)


def test_cropped_table_keeps_the_extent():
    from cryoai.io.particles import ParticleTable

    ones = np.ones(3, np.float32)
    table = ParticleTable(stack_files=("a.mrcs",), stack_ids=np.zeros(3), stack_indices=np.arange(3),
                          box_px=128, pixel_size_a=1.5 * ones, defocus_u_a=1e4 * ones, defocus_v_a=1e4 * ones,
                          defocus_angle_rad=0 * ones, voltage_kv=300 * ones, cs_mm=2.7 * ones,
                          amplitude_contrast=0.1 * ones, phase_shift_rad=0 * ones, bfactor_a2=0 * ones)
    small = cropped_table(table, 64)
    assert small.box_px == 64 and small.median_pixel_size_a() == pytest.approx(3.0)
    assert table.box_px == 128 and table.median_pixel_size_a() == pytest.approx(1.5)  # unchanged
    with pytest.raises(ValueError):
        cropped_table(table, 65)


def test_working_box_is_the_policys_grown_to_hold_the_bands():
    policy = Policy()
    assert policy.search_box_px == 64
    assert working_box(64, (10.0,), policy) is None  # the box itself: nothing to crop
    assert working_box(48, (10.0,), policy) is None
    assert working_box(128, (10.0, 5.0), policy) == 64
    assert working_box(256, (40.0,), policy) == 84  # a band of 40 px needs 2 x (40 + 2)
    assert working_box(128, (70.0,), policy) is None  # would not be smaller than the box
    assert working_box(129, (10.0,), policy) is None  # odd boxes are not cropped
    assert working_box(128, (10.0,), Policy(search_box_px=0)) is None


@pytest.fixture(scope="module")
def run_at_a_working_box(tmp_path_factory) -> Path:
    """A 64 px set searched at a 32 px working box (the policy's box set small), reconstructed
    at 64 px."""
    out = tmp_path_factory.mktemp("working-box")
    assert cli(["simulate", "--box", "64", "--n", "400", "--snr-db", "0", "--seed", "3", "--shift-sigma-a",
                "10", "--outdir", str(out / "sim"), "--quiet", "--device", "cpu"]) == 0
    assert cli(["train", str(out / "sim" / "particles.star"), "--outdir", str(out / "run"), "--quiet",
                "--device", "cpu", "--search-box-px", "32", "--pose-encoder", "off", "--search-iterations",
                "60", "--search-batch", "300", "--refine-rounds", "4", "--decoder-epochs", "0.5",
                "--no-tensorboard"]) == 0
    return out


def test_a_run_searches_at_the_working_box_and_reconstructs_at_the_full_box(run_at_a_working_box):
    out = run_at_a_working_box
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    box = next(r for r in log if r.get("stage") == "working_box")
    assert box["box_px"] == 32 and box["full_box_px"] == 64
    assert box["pixel_size_a"] == pytest.approx(10.0)
    assert "Fourier-cropped to 32 px" in (out / "run" / "run.log").read_text()
    import mrcfile

    with mrcfile.open(out / "run" / "volume.mrc") as mrc:
        assert mrc.data.shape == (64, 64, 64) and float(mrc.voxel_size.x) == pytest.approx(5.0)
    truth = load_particles(out / "sim" / "particles.star")
    posed = load_particles(out / "run" / "poses.star")
    errors = align_rotations(posed.rotations, truth.rotations)["angle_deg"]
    # measured 1.06 deg (18 s); the same run at the full box: 0.83 deg (43 s)
    assert np.median(errors) < 3.0, np.median(errors)


def test_predict_poses_poses_at_the_runs_working_box(run_at_a_working_box, capsys):
    out = run_at_a_working_box
    assert cli(["predict-poses", str(out / "run" / "checkpoint.pt"), str(out / "sim" / "particles.star"),
                "--out", str(out / "predicted.star"), "--quiet", "--device", "cpu"]) == 0
    run = load_particles(out / "run" / "poses.star").rotations
    again = load_particles(out / "predicted.star").rotations
    # the same frame: no global alignment; the run's own poses (its assignment) against its map
    cos = (np.einsum("nij,nij->n", run, again) - 1) / 2
    angles = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(angles) < 5.0, np.median(angles)
