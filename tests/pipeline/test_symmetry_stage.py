"""The symmetry stage (``--sym``): a C4 data set whose search came out in an arbitrary frame is
put in RELION's frame for C4 and symmetrised; a wrong group is caught and not imposed; the half
maps' agreement separates a group's own operators from others'.
"""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryoai.assets import embedded_map_path
from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.physics.fft import fourier_crop_3d, ifft3_c
from cryoai.physics.grids import grid_3d
from cryoai.physics.poses import Poses
from cryoai.physics.projection import sample_volume
from cryoai.physics.rotations import random_rotations
from cryoai.physics.symmetry import point_group
from cryoai.pipeline.records import Particles
from cryoai.pipeline.symmetry import symmetry_stage
from cryoai.reconstruction import ParticleSpectra, reconstruct
from cryoai.reconstruction.pose_search import SubsetSearch
from cryoai.reconstruction.symmetry_axes import half_map_agreement
from cryoai.training.config import TrainConfig


def _turned(volume, m):
    g = grid_3d(volume.shape[-1], dtype=volume.dtype)
    return sample_volume(volume, torch.einsum("ij,zyxj->zyxi", m.to(volume.dtype), g))


def c4_map(box_px: int = 32) -> torch.Tensor:
    """The embedded ribosome Fourier-cropped to ``box_px``, made C4 about z by averaging it over
    the group (how docs/pipeline.md#symmetry makes symmetric test maps from real ones).
    """
    volume = torch.as_tensor(mrcfile.read(embedded_map_path()).astype(np.float64))
    small = fourier_crop_3d(volume, box_px)
    return sum(_turned(small, s) for s in point_group("C4")) / 4


@pytest.fixture(scope="module")
def c4_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("c4")
    volume = c4_map()
    with mrcfile.new(out / "c4.mrc") as f:
        f.set_data(volume.numpy().astype(np.float32))
        f.voxel_size = 10.0
    assert cli(["simulate", "--map", str(out / "c4.mrc"), "--n", "600", "--snr-db", "-5", "--outdir",
                str(out / "sim"), "--quiet", "--seed", "3"]) == 0
    table = load_particles(out / "sim" / "particles.star")
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    dataset = ParticleDataset(table)
    particles = Particles(table, dataset, formation, torch.device("cpu"))
    return particles, table.poses()


def _search_in_a_turned_frame(particles, poses, turn):
    """What the search would return had it found the true poses in the frame ``x = turn x_std``."""
    spectra = ParticleSpectra(particles.dataset, particles.formation, particles.device)
    y, c = spectra.read(np.arange(len(poses)))
    rotations = turn.float() @ poses.rotations
    rec = reconstruct(spectra, Poses(rotations, poses.shifts_a), mask_radius_px=14.0)
    return SubsetSearch(subset=np.arange(len(poses)), rotations=rotations,
                        shifts_px=poses.shifts_a / particles.pixel_size_a, fourier_volume=rec.fourier_volume,
                        spectra=y, ctf=c)


def _worst_operator_deg(a, b):
    d = float(torch.cdist(a.reshape(-1, 9).double(), b.reshape(-1, 9).double()).min(dim=1).values.max())
    return math.degrees(2 * math.asin(min(1.0, d / (2 * math.sqrt(2)))))


def test_a_c4_search_is_put_in_relions_frame_and_symmetrised(c4_set):
    particles, poses = c4_set
    turn = random_rotations(1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)[0]
    found = _search_in_a_turned_frame(particles, poses, turn)
    cfg = TrainConfig(sym="C4")
    record = symmetry_stage(particles, cfg, found, say=lambda _: None)
    assert record.imposed == "C4" and not record.warnings
    group = point_group("C4")
    # the group's operators in the search's frame, as found, are the true ones (x_std = turn^T x)
    q = record.rotation.double()
    assert _worst_operator_deg(q.T @ group @ q, turn @ group @ turn.T) < 2.0
    # the poses in the standard frame are the true ones up to an operator of C4's normaliser
    # (a turn about z, or a half turn about an axis in xy): each pose's view direction (z of the
    # pose) has the same angle to the group's axis as the truth's
    cos_found = record.found.rotations[:, 2, 2].double()
    cos_true = poses.rotations[:, 2, 2].double()
    assert float((cos_found.abs() - cos_true.abs()).abs().median()) < 0.03
    # the subset's map is C4 about z
    volume = ifft3_c(record.found.fourier_volume).real
    inner = volume[1:, 1:, 1:]
    error = float((torch.rot90(inner, 1, dims=(1, 2)) - inner).norm() / inner.norm())
    assert error < 0.05
    assert min(record.figures["agreement"][1:]) >= cfg.policy.symmetry_min_agreement


def test_a_wrong_group_is_caught_and_not_imposed(c4_set):
    particles, poses = c4_set
    turn = random_rotations(1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)[0]
    found = _search_in_a_turned_frame(particles, poses, turn)
    record = symmetry_stage(particles, TrainConfig(sym="C6"), found, say=lambda _: None)
    assert record.imposed == "C1" and record.operators is None
    assert len(record.warnings) == 1 and "do not support --sym C6" in record.warnings[0]
    assert torch.equal(record.found.rotations, found.rotations)  # nothing turned


def test_the_half_maps_agreement_separates_a_groups_operators_from_others():
    volume = c4_map()
    gen = torch.Generator().manual_seed(2)
    noise = [torch.randn(volume.shape, generator=gen, dtype=torch.float64) * 0.3 * volume.std()
             for _ in range(2)]
    halves = (volume + noise[0], volume + noise[1])
    _, c4 = half_map_agreement(halves, point_group("C4"))
    _, c6 = half_map_agreement(halves, point_group("C6"))
    assert float(c4[0]) == pytest.approx(1.0) and float(c4.min()) > 0.9
    assert float(c6[3]) > 0.9  # C6's half turn is C4's too
    assert float(c6[[1, 2, 4, 5]].max()) < 0.9  # its turns by 60 and 120 degrees are not


def test_the_global_search_over_an_asymmetric_unit_finds_each_pose_up_to_the_group(c4_set):
    from cryoai.evaluation.metrics import align_rotations
    from cryoai.pipeline.settings import assignment_settings
    from cryoai.reconstruction import PoseAssigner

    particles, poses = c4_set
    spectra = ParticleSpectra(particles.dataset, particles.formation, particles.device)
    rows = np.arange(120)
    y, c = spectra.read(rows)
    group = point_group("C4")
    volume = reconstruct(spectra, poses, mask_radius_px=14.0, symmetry=group.float()).fourier_volume
    settings = assignment_settings(TrainConfig(), particles.box_px)
    errors = {}
    for name, sym in (("full", None), ("unit", group.float())):
        assigner = PoseAssigner(particles.formation, volume, settings, symmetry=sym)
        rot, _ = assigner.assign(y, c)
        errors[name] = align_rotations(rot.double().numpy(), poses.rotations[rows].double().numpy(),
                                       symmetry=group)["angle_deg"]
        if sym is not None:  # a quarter of the grid and a margin
            assert len(assigner.grid) < 0.45 * settings.n_rotations
    assert np.median(errors["unit"]) < 3.0
    assert np.median(errors["unit"]) < np.median(errors["full"]) + 0.5


@pytest.mark.slow  # (about 25 s: 13 frame searches)
def test_auto_proposes_the_group_without_imposing_it(c4_set):
    particles, poses = c4_set
    turn = random_rotations(1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)[0]
    found = _search_in_a_turned_frame(particles, poses, turn)
    said = []
    record = symmetry_stage(particles, TrainConfig(sym="auto"), found, say=said.append)
    assert record.figures["proposed"] == "C4"
    assert record.imposed == "C1" and record.operators is None
    assert "--sym C4" in record.said[0]
    tested = record.figures["tested"]
    assert tested["C2"] >= 0.9 and tested["C4"] >= 0.9  # C4 and its subgroup hold ...
    assert max(tested[f"C{n}"] for n in (3, 5, 6, 8)) < 0.9  # ... the others do not
    assert "D4" in tested and tested["D4"] < 0.9
