"""Coordinate and frequency grids, Hermitian half-plane and mirror indices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoai.physics.fft import fft2_c
from cryoai.physics.grids import (
    centered_coords_1d,
    frequency_grid_2d,
    grid_2d,
    grid_3d,
    half_plane_mask,
    in_half_space,
    max_paired_radius_px,
    mirror_index_2d,
    n_shells,
    radius_grid_2d,
    radius_grid_3d,
    shell_index,
)

F64 = torch.float64


@pytest.mark.parametrize("n", [4, 9, 16])
def test_coordinate_grids(n):
    c = np.arange(n) - n // 2
    np.testing.assert_array_equal(centered_coords_1d(n, dtype=F64).numpy(), c)
    g2 = grid_2d(n, dtype=F64).numpy()
    y, x = np.meshgrid(c, c, indexing="ij")
    np.testing.assert_array_equal(g2, np.stack([x, y], -1), err_msg="grid_2d is not (x=col, y=row)")
    g3 = grid_3d(n, dtype=F64).numpy()
    z, y3, x3 = np.meshgrid(c, c, c, indexing="ij")
    np.testing.assert_array_equal(g3, np.stack([x3, y3, z], -1),
                                  err_msg="grid_3d is not [z, y, x] holding (x, y, z)")
    np.testing.assert_allclose(radius_grid_2d(n, dtype=F64).numpy(), np.hypot(x, y), atol=1e-14)
    np.testing.assert_allclose(radius_grid_3d(n, dtype=F64).numpy(),
                               np.sqrt(x3**2 + y3**2 + z**2), atol=1e-14)


@pytest.mark.parametrize("n, pixel", [(8, 1.0), (64, 1.31), (100, 4.2)])
def test_frequency_grid_matches_numpy_fftfreq(n, pixel):
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel))
    g = frequency_grid_2d(n, pixel, dtype=F64).numpy()
    np.testing.assert_allclose(g[..., 0], np.broadcast_to(f[None, :], (n, n)), rtol=0,
                               atol=1e-15, err_msg="kx must vary along columns")
    np.testing.assert_allclose(g[..., 1], np.broadcast_to(f[:, None], (n, n)), rtol=0,
                               atol=1e-15, err_msg="ky must vary along rows")
    assert g[0, 0, 0] == pytest.approx(-0.5 / pixel), "index 0 must be Nyquist -1/2 cycle/pixel"


def test_frequency_grid_matches_fft2_c_of_a_plane_wave():
    n, pixel = 32, 2.5
    kx, ky = 0.05, -0.0875  # cycles per Angstrom, on the grid
    c = (np.arange(n) - n // 2) * pixel
    y, x = np.meshgrid(c, c, indexing="ij")
    spec = fft2_c(torch.from_numpy(np.exp(2j * np.pi * (kx * x + ky * y)))).abs()
    peak = np.unravel_index(int(spec.argmax()), spec.shape)
    g = frequency_grid_2d(n, pixel, dtype=F64)
    np.testing.assert_allclose(g[peak].numpy(), [kx, ky], atol=1e-12)


@pytest.mark.parametrize("n", [8, 16, 32])
def test_mirror_index(n):
    mirror = mirror_index_2d(n)
    assert mirror.shape == (n * n,) and mirror.dtype == torch.long
    assert torch.equal(mirror[mirror], torch.arange(n * n)), "mirror is not an involution"
    g = grid_2d(n, dtype=F64).reshape(-1, 2)
    # Per axis: index i -> (N - i) mod N, i.e. k -> -k with Nyquist (index 0) fixed.
    i = np.arange(n)
    neg = (n - i) % n
    ref = (neg[:, None] * n + neg[None, :]).reshape(-1)
    np.testing.assert_array_equal(mirror.numpy(), ref)
    interior = (g[:, 0] > -n // 2) & (g[:, 1] > -n // 2)
    torch.testing.assert_close(g[mirror][interior], -g[interior], rtol=0, atol=0)
    # A real image's centred spectrum obeys F[mirror] == conj(F) at every index (Nyquist too,
    # since -N/2 == N/2 mod N).
    img = torch.from_numpy(np.random.default_rng(n).standard_normal((n, n)))
    f = fft2_c(img).reshape(-1)
    torch.testing.assert_close(f[mirror], f.conj(), rtol=0, atol=1e-12 * f.abs().max())


@pytest.mark.parametrize("n", [8, 16, 64])
def test_half_plane_and_its_mirror_cover_the_disk_once(n):
    half = half_plane_mask(n).reshape(-1)
    mirror = mirror_index_2d(n)
    g = grid_2d(n, dtype=F64).reshape(-1, 2)
    disk = g.norm(dim=-1) <= n // 2 - 1
    dc = (g[:, 0] == 0) & (g[:, 1] == 0)
    mirrored = torch.zeros_like(half)
    mirrored[mirror[half]] = True
    assert torch.equal(half | mirrored, disk), "half-plane plus mirror is not the disk"
    assert torch.equal(half & mirrored, dc), "half-plane and its mirror overlap beyond DC"
    assert int(half.sum()) == (int(disk.sum()) + 1) // 2
    # Exactly the convention stated: ky > 0, or ky == 0 and kx >= 0.
    kx, ky = g[:, 0], g[:, 1]
    assert torch.equal(half, disk & ((ky > 0) | ((ky == 0) & (kx >= 0))))
    # No unpaired Nyquist row/column in the default half.
    nyq = (kx == -n // 2) | (ky == -n // 2)
    assert not bool((half & nyq).any())
    # A real spectrum is rebuilt exactly from its half inside the disk.
    img = torch.from_numpy(np.random.default_rng(n).standard_normal((n, n)))
    f = fft2_c(img).reshape(-1)
    rebuilt = torch.zeros_like(f)
    rebuilt[half] = f[half]
    rebuilt[mirror[half]] = f[half].conj()
    torch.testing.assert_close(rebuilt[disk], f[disk], rtol=0, atol=1e-12 * f.abs().max())


def test_half_plane_custom_radius():
    n = 16
    half = half_plane_mask(n, max_radius=3.0)
    g = grid_2d(n, dtype=F64)
    assert not bool(half[g.norm(dim=-1) > 3.0].any())
    assert bool(half[n // 2, n // 2 + 3]) and not bool(half[n // 2, n // 2 - 3])


# ------------------------------------------------------------------ shells, half space, Nyquist


def test_shell_index_is_the_nearest_integer_radius():
    r = torch.tensor([0.0, 0.49, 0.51, 1.0, 1.4999, 2.5001, 7.3, 11.9], dtype=F64)
    s = shell_index(r)
    assert s.dtype == torch.long
    assert s.tolist() == [0, 0, 1, 1, 1, 3, 7, 12]
    # On a 3D grid: every voxel's shell is within half a frequency pixel of its radius.
    n = 12
    rad = radius_grid_3d(n, dtype=F64)
    s3 = shell_index(rad)
    assert s3.shape == (n, n, n)
    assert float((s3.to(F64) - rad).abs().max()) <= 0.5
    # The corners lie beyond the last FSC shell N//2; the axes reach it exactly.
    assert int(s3.max()) == round(math.sqrt(3) * n / 2) > n_shells(n) - 1
    assert int(s3[n // 2, n // 2, 0]) == n // 2


@pytest.mark.parametrize("n, expected", [(2, 2), (8, 5), (64, 33), (128, 65)])
def test_n_shells(n, expected):
    assert n_shells(n) == expected
    # One shell per integer radius from Nyquist (index 0, -N/2) to DC (index N//2) along an axis.
    axis = shell_index(radius_grid_2d(n, dtype=F64)[n // 2, : n // 2 + 1])
    assert n_shells(n) == len(set(axis.tolist()))


@pytest.mark.parametrize("n", [4, 8, 16, 64])
def test_max_paired_radius_px(n):
    r = max_paired_radius_px(n)
    assert r == n // 2 - 1
    # Brute force over an even box: the largest integer radius R such that every frequency with
    # |k| <= R has its partner -k in the box (frequencies run from -N/2 to N/2 - 1).
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    in_box = lambda v: (v >= -(n // 2)) & (v <= n // 2 - 1)  # noqa: E731
    paired = in_box(-x) & in_box(-y)
    radius = np.hypot(x, y)
    ok = [rr for rr in range(n) if paired[radius <= rr].all()]
    assert max(ok) == r, "max_paired_radius_px is not the largest fully paired radius"
    # Nyquist itself (N/2) is not paired.
    assert not paired[radius <= n // 2].all()


def _half_space_brute_force(pt) -> bool:
    """One of k, -k (k != 0): the first nonzero coordinate from the last axis is positive."""
    for v in reversed(pt):
        if v != 0:
            return v > 0
    return True  # the origin


@pytest.mark.parametrize("dim", [2, 3])
def test_in_half_space_against_brute_force(dim):
    c = np.arange(-3, 4)
    pts = np.stack(np.meshgrid(*([c] * dim), indexing="ij"), -1).reshape(-1, dim).astype(float)
    ref = np.array([_half_space_brute_force(p) for p in pts])
    got = in_half_space(torch.from_numpy(pts))
    assert got.dtype == torch.bool and got.shape == (len(pts),)
    np.testing.assert_array_equal(got.numpy(), ref)
    # Exactly one of each pair k, -k (k != 0) is inside, and the origin is.
    neg = in_half_space(torch.from_numpy(-pts)).numpy()
    origin = (pts == 0).all(-1)
    assert (ref ^ neg)[~origin].all() and ref[origin].all()
    # Batched leading axes are kept.
    assert in_half_space(torch.from_numpy(pts).reshape(7, -1, dim)).shape == (7, len(pts) // 7)


def test_in_half_space_formulas_as_documented():
    g3 = grid_3d(6, dtype=F64)
    x, y, z = g3.unbind(-1)
    assert torch.equal(in_half_space(g3), (z > 0) | ((z == 0) & ((y > 0) | ((y == 0) & (x >= 0)))))
    g2 = grid_2d(6, dtype=F64)
    assert torch.equal(in_half_space(g2), (g2[..., 1] > 0) | ((g2[..., 1] == 0) & (g2[..., 0] >= 0)))
    with pytest.raises(ValueError):
        in_half_space(torch.zeros(5, 4))


def test_half_plane_mask_default_radius_is_max_paired_radius():
    for n in (8, 16):
        assert torch.equal(half_plane_mask(n), half_plane_mask(n, max_radius=max_paired_radius_px(n)))
        assert not torch.equal(half_plane_mask(n), half_plane_mask(n, max_radius=n // 2))
