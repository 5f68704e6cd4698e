"""Reconstruction with a point group: each particle inserted once per operator (``S R``)."""

from __future__ import annotations

import pytest
import torch

from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.poses import Poses
from cryoai.physics.symmetry import point_group
from cryoai.reconstruction import ParticleSpectra, reconstruct
from cryoai.reconstruction.regularised import backproject_particles


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    out = tmp_path_factory.mktemp("sym")
    assert cli(["simulate", "--box", "24", "--n", "40", "--snr-db", "0", "--outdir", str(out), "--quiet",
                "--seed", "5"]) == 0
    table = load_particles(out / "particles.star")
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    return ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu")), table.poses()


def test_symmetric_sums_are_the_sums_at_every_equivalent_pose(particles):
    spectra, poses = particles
    rows = torch.arange(len(poses)).numpy()
    group = point_group("D2")
    num, den = backproject_particles(spectra, rows, poses, symmetry=group)
    ref_num, ref_den = 0, 0
    for op in group.float():  # the independent reference: the plain sums at S R, added
        a, b = backproject_particles(spectra, rows, Poses(op @ poses.rotations, poses.shifts_a))
        ref_num, ref_den = ref_num + a, ref_den + b
    torch.testing.assert_close(num, ref_num, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(den, ref_den, rtol=1e-4, atol=1e-4)
    # C1 (or None) is the plain insertion, bit for bit
    plain = backproject_particles(spectra, rows, poses)
    assert torch.equal(backproject_particles(spectra, rows, poses, symmetry=point_group("C1"))[0], plain[0])


def test_a_c4_reconstruction_is_c4_symmetric(particles):
    spectra, poses = particles
    c1 = reconstruct(spectra, poses, mask_radius_px=10.0)
    c4 = reconstruct(spectra, poses, mask_radius_px=10.0, symmetry=point_group("C4"))
    # the volume [z, y, x] rotated by 90 degrees about z (in the y, x plane), about the box
    # centre (index N//2: the crop [1:] is centred), is the same map; the C1 one is not
    for rec, symmetric in ((c4, True), (c1, False)):
        inner = rec.fourier_volume[1:, 1:, 1:]
        turned = torch.rot90(inner, 1, dims=(1, 2))
        error = float((turned - inner).abs().max() / inner.abs().max())
        assert (error < 1e-4) == symmetric, error
