"""Fourier shifts and the exact 180-degree in-plane rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoai.physics.fft import fft2_c
from cryoai.physics.grids import frequency_grid_2d, grid_2d
from cryoai.physics.projection import project_real_space
from cryoai.physics.rotations import in_plane_180
from cryoai.physics.shifts import phase_shift, rotate_180, shift_images

from ._refs import gaussian_image, gaussian_volume

F64 = torch.float64


def _randn(shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def test_phase_shift_formula():
    freqs = _randn((5, 7, 2), 0)
    shifts = _randn((3, 2), 1)
    out = phase_shift(freqs, shifts)
    assert out.shape == (3, 5, 7) and out.is_complex()
    f, t = freqs.numpy(), shifts.numpy()
    ref = np.exp(-2j * np.pi * (f[None, ..., 0] * t[:, None, None, 0]
                                + f[None, ..., 1] * t[:, None, None, 1]))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-13, err_msg="phase != exp(-2 pi i k.t)")
    # (M, 2) frequency lists work too.
    assert phase_shift(freqs.reshape(-1, 2), shifts).shape == (3, 35)


@pytest.mark.parametrize("shift", [(3.5, -2.25), (-6.0, 4.0), (0.3, 0.0), (0.0, -7.7)])
def test_shift_moves_gaussian_by_plus_sx_columns_and_plus_sy_rows(shift):
    n, sigma = 64, 3.0
    img = torch.from_numpy(gaussian_image(n, (0.0, 0.0), sigma))[None]
    out = shift_images(img, torch.tensor([shift], dtype=F64))[0].numpy()
    expected = gaussian_image(n, shift, sigma)
    np.testing.assert_allclose(out, expected, atol=1e-10,
                               err_msg=f"shift {shift} did not move the Gaussian by (+sx, +sy)")


@pytest.mark.parametrize("shift", [(1, 0), (0, 1), (3, -5), (-8, 13), (32, -32), (70, 1)])
def test_integer_shift_equals_roll(shift):
    imgs = _randn((2, 32, 32), 2)
    delta = torch.zeros(1, 32, 32, dtype=F64)
    delta[0, 16, 16] = 1.0
    sx, sy = shift
    for x in (imgs, delta):
        out = shift_images(x, torch.tensor([shift] * x.shape[0], dtype=F64))
        ref = torch.roll(x, shifts=(sy, sx), dims=(-2, -1))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12,
                                   msg=f"integer shift {shift} != torch.roll by (rows={sy}, "
                                       f"cols={sx})")
    moved = shift_images(delta, torch.tensor([shift], dtype=F64))[0]
    assert moved.argmax() == ((16 + sy) % 32) * 32 + (16 + sx) % 32


def test_phase_shift_units_angstrom_vs_pixels():
    n, pixel = 32, 1.7
    shift_px = torch.tensor([[2.3, -1.1], [0.0, 4.0]], dtype=F64)
    in_a = phase_shift(frequency_grid_2d(n, pixel, dtype=F64), shift_px * pixel)
    in_px = phase_shift(grid_2d(n, dtype=F64) / n, shift_px)
    torch.testing.assert_close(in_a, in_px, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- rotate_180


def _rotate_180_loop(img: np.ndarray) -> np.ndarray:
    """Pixel (x, y) -> (-x, -y) about index N//2; coordinate -N/2 (index 0) maps to itself."""
    n = img.shape[-1]
    c = n // 2
    out = np.zeros_like(img)
    for iy in range(n):
        for ix in range(n):
            x, y = ix - c, iy - c
            tx = -x + c if ix != 0 else 0
            ty = -y + c if iy != 0 else 0
            out[..., ty, tx] = img[..., iy, ix]
    return out


@pytest.mark.parametrize("n", [8, 16])
def test_rotate_180_index_map(n):
    img = _randn((3, n, n), n)
    out = rotate_180(img)
    np.testing.assert_array_equal(out.numpy(), _rotate_180_loop(img.numpy()),
                                  err_msg="rotate_180 is not (x, y) -> (-x, -y) about N//2")
    torch.testing.assert_close(rotate_180(out), img, rtol=0, atol=0,
                               msg="rotate_180 applied twice is not the identity")
    c = n // 2
    delta = torch.zeros(n, n, dtype=F64)
    delta[c, c] = 1.0
    assert torch.equal(rotate_180(delta), delta), "rotate_180 moves the centre pixel"
    delta2 = torch.zeros(n, n, dtype=F64)
    delta2[c + 1, c + 3] = 1.0  # (x, y) = (3, 1) -> (-3, -1)
    assert rotate_180(delta2)[c - 1, c - 3] == 1.0


def test_bare_flip_is_off_by_one_pixel():
    n = 16
    c = n // 2
    delta = torch.zeros(n, n, dtype=F64)
    delta[c, c] = 1.0
    flipped = torch.flip(delta, dims=(-2, -1))
    assert flipped[c - 1, c - 1] == 1.0, "a bare flip moves the centre to (N//2 - 1, N//2 - 1)"
    img = _randn((n, n), 3)
    torch.testing.assert_close(torch.flip(img, (-2, -1)),
                               torch.roll(rotate_180(img), (-1, -1), (-2, -1)), rtol=0, atol=0)


@pytest.mark.parametrize("n", [8, 32])
def test_rotate_180_is_conjugation_of_the_centred_spectrum(n):
    """For a real image, fft2_c(rotate_180(img)) == conj(fft2_c(img)) at EVERY frequency.

    rotate_180 is the periodic reflection x -> -x (mod N), so the identity is exact, also on
    the Nyquist row and column (index 0): there -N/2 == +N/2 (mod N) and conjugation pairs
    F(kx, -N/2) with itself up to kx -> -kx, exactly as the reflected image does. What the
    Nyquist row/column lacks is a partner *inside the centred box* for a geometric (non-
    periodic) rotation; e.g. the bare flip below is off by a one-pixel phase ramp everywhere.
    """
    img = _randn((2, n, n), 4 + n)
    spec = fft2_c(img)
    rotated = fft2_c(rotate_180(img))
    torch.testing.assert_close(rotated, spec.conj(), rtol=0, atol=1e-12 * spec.abs().max(),
                               msg="fft2_c(rotate_180(img)) != conj(fft2_c(img))")
    nyq = rotated[..., 0, :]
    assert nyq.abs().max() > 1e-3, "the Nyquist row must be non-trivial for this check to bite"
    # The bare flip: F_flip(k) = conj(F(k)) * exp(+2 pi i (kx + ky) / N) (a one-pixel shift).
    k = grid_2d(n, dtype=F64)
    ramp = torch.exp(2j * np.pi * (k[..., 0] + k[..., 1]) / n)
    flip_spec = fft2_c(torch.flip(img, (-2, -1)))
    torch.testing.assert_close(flip_spec, spec.conj() * ramp, rtol=0,
                               atol=1e-12 * spec.abs().max())
    assert (flip_spec - spec.conj()).abs().max() > 0.1 * spec.abs().max()


def test_rotate_180_matches_in_plane_180_pose():
    """Projecting with R @ Rz(pi) equals rotating the projection with R by 180 degrees.

    Exact away from the Nyquist row/column (index 0): there the pose R @ Rz(pi) looks at
    coordinate +N/2, outside the box, whereas rotate_180 keeps row/column 0 in place.
    """
    n = 32
    vol = gaussian_volume(n, (4.0, -2.0, 3.0), 2.5) + gaussian_volume(n, (-3.0, 5.0, 0.0), 2.0)
    rots = torch.from_numpy(Rotation.random(4, random_state=5).as_matrix())
    direct = project_real_space(vol, in_plane_180(rots))
    via_image = rotate_180(project_real_space(vol, rots))
    scale = direct.abs().max()
    torch.testing.assert_close(direct[:, 1:, 1:], via_image[:, 1:, 1:], rtol=0,
                               atol=1e-12 * scale,
                               msg="project(R Rz(pi)) != rotate_180(project(R)) off Nyquist")
    # Without the roll (bare flip) the two are clearly different.
    flipped = torch.flip(project_real_space(vol, rots), (-2, -1))
    assert (direct[:, 1:, 1:] - flipped[:, 1:, 1:]).abs().max() > 0.05 * scale
