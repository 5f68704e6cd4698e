"""The frame of a map's point group: found in a map turned at random, and scored."""

import math

import torch

from cryoai.physics.grids import grid_3d
from cryoai.physics.projection import sample_volume
from cryoai.physics.rotations import random_rotations
from cryoai.physics.symmetry import point_group
from cryoai.reconstruction.symmetry_axes import find_symmetry_frame, symmetry_correlations


def _turned(volume, m):
    g = grid_3d(volume.shape[-1], dtype=torch.float64)
    return sample_volume(volume, torch.einsum("ij,zyxj->zyxi", m, g))


def _blobby(n=32, seed=3):
    """A smooth asymmetric map inside a sphere."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, n, n, generator=gen, dtype=torch.float64)
    v = torch.nn.functional.avg_pool3d(v[None, None], 7, 1, 3)[0, 0]
    return v * (grid_3d(n, dtype=torch.float64).norm(dim=-1) < 11)


def _worst_operator_deg(q_true, q_found, group):
    """How far the group's operators in the map's frame, as found, are from the true ones (deg)."""
    a = q_true.T @ group @ q_true
    b = q_found.T @ group @ q_found
    d = float(torch.cdist(a.reshape(-1, 9), b.reshape(-1, 9)).min(dim=1).values.max())
    return math.degrees(2 * math.asin(min(1.0, d / (2 * math.sqrt(2)))))


def test_the_axes_of_a_turned_symmetric_map_are_found_within_a_degree():
    gen = torch.Generator().manual_seed(5)
    base = _blobby()
    for symbol in ("C4", "D2"):
        group = point_group(symbol)
        symmetric = sum(_turned(base, s) for s in group) / len(group)  # axes in RELION's frame
        q_true = random_rotations(1, generator=gen, dtype=torch.float64)[0]
        in_map_frame = _turned(symmetric, q_true)  # x_std = q_true x
        found = find_symmetry_frame(in_map_frame, group, box_px=20, n_rotations=1152,
                                    generator=torch.Generator().manual_seed(0))
        assert _worst_operator_deg(q_true, found.rotation, group) < 1.0, symbol
        assert found.score > 0.95 and len(found.correlations) == len(group)
        assert abs(float(found.correlations[0]) - 1) < 1e-9  # the identity
    # the frame matters: the same map scored in the identity frame obeys the group far less
    assert float(symmetry_correlations(in_map_frame, group)[1:].mean()) < 0.8


def test_an_asymmetric_map_does_not_obey_a_group_in_any_frame():
    found = find_symmetry_frame(_blobby(seed=4), point_group("C4"), box_px=20, n_rotations=1152,
                                generator=torch.Generator().manual_seed(0))
    assert found.score < 0.8
