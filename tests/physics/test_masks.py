"""Circular/spherical masks and the soft edge window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoai.physics.masks import (
    MAP_MASK_RADIUS_FRAC,
    circular_mask,
    map_mask_radius_px,
    soft_edge_window_2d,
    spherical_mask,
)

F64 = torch.float64


def _radius_2d(n):
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.hypot(x, y)


@pytest.mark.parametrize("n, radius", [(64, 20.0), (64, 31.5), (128, 50.0), (64, None)])
def test_circular_mask_area(n, radius):
    mask = circular_mask(n, radius, dtype=F64)
    r = radius if radius is not None else n / 2
    assert mask.shape == (n, n)
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}, "hard mask must be binary"
    # Exact lattice count, then the continuum area.
    count = int((_radius_2d(n) <= r).sum())
    assert int(mask.sum()) == count, "mask is not 1 exactly where |x| <= radius about N//2"
    assert abs(count - math.pi * r**2) < 0.02 * math.pi * r**2, "area is not ~ pi r^2"
    assert mask[n // 2, n // 2] == 1.0


def test_spherical_mask_volume():
    n, r = 48, 15.0
    mask = spherical_mask(n, r, dtype=F64)
    assert mask.shape == (n, n, n)
    expected = 4 / 3 * math.pi * r**3
    assert abs(float(mask.sum()) - expected) < 0.02 * expected
    # Same radial profile as the circular mask on the central plane.
    torch.testing.assert_close(mask[n // 2], circular_mask(n, r, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("radius, edge", [(10.0, 5.0), (20.0, 8.0), (25.5, 3.0)])
def test_soft_edge_profile(radius, edge):
    n = 64
    mask = circular_mask(n, radius, soft_edge_px=edge, dtype=F64).numpy()
    r = _radius_2d(n)
    assert np.all(mask[r <= radius] == 1.0), "soft mask must be 1 inside the radius"
    assert np.all(mask[r >= radius + edge] == 0.0), "soft mask must be 0 beyond radius + edge"
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    order = np.argsort(r, axis=None, kind="stable")
    assert np.all(np.diff(mask.ravel()[order]) <= 1e-15), "soft edge is not monotone in radius"
    band = (r > radius) & (r < radius + edge)
    assert np.all((mask[band] > 0) & (mask[band] < 1))
    expected = 0.5 * (1 + np.cos(np.pi * (r[band] - radius) / edge))  # raised cosine
    np.testing.assert_allclose(mask[band], expected, atol=1e-12)


def test_soft_edge_window_2d():
    n, width = 32, 6.0
    w = soft_edge_window_2d(n, width, dtype=F64).numpy()
    assert w.shape == (n, n)
    assert np.all(w[0, :] == 0) and np.all(w[:, 0] == 0)
    assert np.all(w[-1, :] == 0) and np.all(w[:, -1] == 0)
    inner = slice(int(width), n - int(width))
    assert np.all(w[inner, inner] == 1.0), "window must be 1 in the interior"
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=0)
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w, np.outer(w[:, n // 2], w[n // 2, :]), atol=1e-15)
    assert np.all(np.diff(w[n // 2, : n // 2]) >= 0), "window must rise monotonically"


@pytest.mark.parametrize("box", [64, 128, 200])
def test_map_mask_radius_px(box):
    assert MAP_MASK_RADIUS_FRAC == 0.45
    # A positive fraction is used as given.
    assert map_mask_radius_px(box, 0.3) == 0.3 * box
    assert map_mask_radius_px(box, 0.5) == 0.5 * box
    # 0 (encoder-input mask off) still masks maps, at 0.45 of the box.
    assert map_mask_radius_px(box, 0.0) == 0.45 * box
    assert map_mask_radius_px(box, 0) == 0.45 * box
