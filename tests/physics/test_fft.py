"""Centred FFTs, Fourier cropping and padding against numpy and analytic signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoai.physics.fft import (
    crop_center_2d,
    fft2_c,
    fft3_c,
    fourier_crop_2d,
    fourier_crop_3d,
    half_spectrum,
    half_spectrum_index,
    ifft2_c,
    ifft3_c,
    pad_volume,
)
from cryoai.physics.projection import extract_central_slices


def _randn(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _centred_ref(x: np.ndarray, axes, inverse: bool = False) -> np.ndarray:
    f = np.fft.ifftn if inverse else np.fft.fftn
    return np.fft.fftshift(f(np.fft.ifftshift(x, axes=axes), axes=axes), axes=axes)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("n", [8, 16, 64])
def test_fft2_c_round_trip(n):
    x = torch.from_numpy(_randn((3, n, n), n))
    y = ifft2_c(fft2_c(x))
    assert y.imag.abs().max() < 1e-12, "ifft2_c(fft2_c(real)) should be real"
    torch.testing.assert_close(y.real, x, rtol=0, atol=1e-12, msg="ifft2_c(fft2_c(x)) != x")
    z = torch.complex(x, torch.from_numpy(_randn((3, n, n), n + 1)))
    torch.testing.assert_close(fft2_c(ifft2_c(z)), z, rtol=0, atol=1e-10,
                               msg="fft2_c(ifft2_c(z)) != z")


@pytest.mark.parametrize("n", [8, 24])
def test_fft3_c_round_trip(n):
    x = torch.from_numpy(_randn((2, n, n, n), n))
    y = ifft3_c(fft3_c(x))
    assert y.imag.abs().max() < 1e-12, "ifft3_c(fft3_c(real)) should be real"
    torch.testing.assert_close(y.real, x, rtol=0, atol=1e-12, msg="ifft3_c(fft3_c(x)) != x")
    z = torch.complex(x, torch.from_numpy(_randn((2, n, n, n), n + 1)))
    torch.testing.assert_close(fft3_c(ifft3_c(z)), z, rtol=0, atol=1e-10,
                               msg="fft3_c(ifft3_c(z)) != z")


@pytest.mark.parametrize("n", [8, 10, 9, 32])  # N/2 even, N/2 odd (sign of the modulation), odd N
def test_centred_transforms_match_numpy(n):
    x2 = _randn((2, n, n), 1) + 1j * _randn((2, n, n), 2)
    x3 = _randn((n, n, n), 3) + 1j * _randn((n, n, n), 4)
    cases = [
        (fft2_c, x2, (-2, -1), False),
        (ifft2_c, x2, (-2, -1), True),
        (fft3_c, x3, (-3, -2, -1), False),
        (ifft3_c, x3, (-3, -2, -1), True),
    ]
    for fn, x, axes, inverse in cases:
        ours = fn(torch.from_numpy(x)).numpy()
        ref = _centred_ref(x, axes, inverse)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10 * np.abs(ref).max(),
                                   err_msg=f"{fn.__name__} != numpy fftshift(fft(ifftshift))")


@pytest.mark.parametrize("shape", [(6, 8), (8, 10), (7, 8)])
def test_fft2_c_non_square_matches_numpy(shape):
    x = _randn((2, *shape), 7) + 1j * _randn((2, *shape), 8)
    for fn, inverse in ((fft2_c, False), (ifft2_c, True)):
        ref = _centred_ref(x, (-2, -1), inverse)
        np.testing.assert_allclose(fn(torch.from_numpy(x)).numpy(), ref, rtol=0,
                                   atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("n", [8, 10, 64])
def test_half_spectrum_matches_numpy_centred_fft(n):
    """Coefficients gathered from a real FFT equal numpy's centred FFT at each (kx, ky >= 0),
    the Nyquist row and column included."""
    x = _randn((3, n, n), 9)
    ky, kx = np.meshgrid(np.arange(0, n // 2 + 1), np.arange(-n // 2, n // 2), indexing="ij")
    coords = torch.as_tensor(np.stack([kx.ravel(), ky.ravel()], -1), dtype=torch.float32)
    flat_index, sign = half_spectrum_index(coords, n)
    ours = half_spectrum(torch.from_numpy(x), flat_index, sign).numpy()
    ref = _centred_ref(x, (-2, -1))[:, (ky.ravel() + n // 2) % n, kx.ravel() + n // 2]  # ky = N/2 is -N/2
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    with pytest.raises(ValueError):
        half_spectrum_index(torch.tensor([[0.0, -1.0]]), n)  # the other half


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 8), (18, 10), (64, 62)])
def test_fourier_crop_2d_matches_centred_crop_numpy(n_in, n_out):
    """The real-FFT crop equals cropping numpy's centred spectrum (new Nyquist row and column
    zeroed) and transforming back."""
    x = _randn((2, n_in, n_in), 10)
    spec = _centred_ref(x, (-2, -1))
    lo = n_in // 2 - n_out // 2
    spec = spec[:, lo:lo + n_out, lo:lo + n_out].copy()
    spec[:, 0, :] = 0
    spec[:, :, 0] = 0
    ref = _centred_ref(spec, (-2, -1), inverse=True).real * (n_out / n_in) ** 2
    np.testing.assert_allclose(fourier_crop_2d(torch.from_numpy(x), n_out).numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [8, 16, 30])
def test_dc_at_centre_equals_sum(n):
    x2 = torch.from_numpy(_randn((n, n), 5))
    x3 = torch.from_numpy(_randn((n, n, n), 6))
    c = n // 2
    dc2 = fft2_c(x2)[c, c]
    dc3 = fft3_c(x3)[c, c, c]
    assert abs(dc2.imag) < 1e-12 and abs(dc2.real - x2.sum()) < 1e-10, "2D DC is not at N//2"
    assert abs(dc3.imag) < 1e-11 and abs(dc3.real - x3.sum()) < 1e-10, "3D DC is not at N//2"


@pytest.mark.parametrize("kx, ky", [(3, 0), (0, 5), (-4, 7), (6, -2)])
def test_plane_wave_lands_at_its_frequency_index(kx, ky):
    """exp(2 pi i (kx x + ky y) / N) with x = col - N//2 peaks at [N//2 + ky, N//2 + kx]."""
    n = 16
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    wave = np.exp(2j * np.pi * (kx * x + ky * y) / n)
    spec = fft2_c(torch.from_numpy(wave)).numpy()
    expected = np.zeros((n, n), complex)
    expected[n // 2 + ky, n // 2 + kx] = n * n
    np.testing.assert_allclose(spec, expected, atol=1e-9,
                               err_msg="frequency of index i is not (i - N//2)/N with x on columns")


@pytest.mark.parametrize("n", [16, 32])
def test_central_slice_identity_pose(n):
    """The central slice of fft3_c(volume) is fft2_c(volume.sum(0)) for R = I."""
    vol = torch.from_numpy(_randn((n, n, n), 7))
    fvol = fft3_c(vol)
    proj_spec = fft2_c(vol.sum(0))
    scale = proj_spec.abs().max()
    # Index statement: plane kz = 0 is index N//2 along z.
    torch.testing.assert_close(fvol[n // 2], proj_spec, rtol=0, atol=1e-12 * scale,
                               msg="fft3_c(v)[N//2] != fft2_c(v.sum(0))")
    # Through the slicer with the identity pose (trilinear weights are exactly 0/1).
    sl = extract_central_slices(fvol, torch.eye(3, dtype=torch.float64)[None])[0]
    torch.testing.assert_close(sl, proj_spec, rtol=0, atol=1e-12 * scale,
                               msg="extract_central_slices(fft3_c(v), I) != fft2_c(v.sum(0))")


# ----------------------------------------------------------------------------- cropping


@pytest.mark.parametrize("n_out", [32, 24, 16, 2])
def test_fourier_crop_2d_preserves_mean(n_out):
    x = torch.from_numpy(_randn((3, 64, 64), 8) + 2.5)
    y = fourier_crop_2d(x, n_out)
    assert y.shape == (3, n_out, n_out)
    assert not y.is_complex()
    torch.testing.assert_close(y.mean((-2, -1)), x.mean((-2, -1)), rtol=0, atol=1e-12,
                               msg="fourier_crop_2d changed the mean")


@pytest.mark.parametrize("n_out", [16, 12, 2])
def test_fourier_crop_3d_preserves_mean(n_out):
    x = torch.from_numpy(_randn((32, 32, 32), 9) - 1.5)
    y = fourier_crop_3d(x, n_out)
    assert y.shape == (n_out, n_out, n_out)
    assert abs(float(y.mean() - x.mean())) < 1e-12, "fourier_crop_3d changed the mean"


def _cosines(coords, waves):
    """sum_j a_j cos(2 pi k_j . r / N + phi_j); coords (..., d) in input pixels, k in cycles/box."""
    out = 0.0
    for amp, k, phase, n in waves:
        out = out + amp * np.cos(2 * np.pi * (coords @ np.asarray(k, float)) / n + phase)
    return out


@pytest.mark.parametrize("n_out", [32, 40, 20])
def test_fourier_crop_2d_band_limited_equals_analytic_samples(n_out):
    """Downsampling a band-limited image gives the exact samples on the coarser grid.

    Output pixel j sits at (j - n_out//2) * N / n_out input pixels (the centre stays put).
    """
    n = 64
    kmax = n_out // 2 - 1  # strictly below the new Nyquist
    rng = np.random.default_rng(n_out)
    waves = [(1.0, (0, 0), 0.0, n)]
    for _ in range(6):
        k = rng.integers(-kmax, kmax + 1, size=2)
        waves.append((rng.uniform(0.2, 1.0), k, rng.uniform(0, 2 * np.pi), n))
    waves.append((0.7, (kmax, -kmax), 0.3, n))  # the highest representable frequency

    def image(size):
        c = (np.arange(size) - size // 2) * (n / size)
        y, x = np.meshgrid(c, c, indexing="ij")
        return _cosines(np.stack([x, y], -1), waves)

    fine = torch.from_numpy(image(n))
    coarse = fourier_crop_2d(fine, n_out).numpy()
    np.testing.assert_allclose(coarse, image(n_out), rtol=0, atol=1e-10,
                               err_msg="cropped band-limited image != analytic samples")


@pytest.mark.parametrize("n_out", [16, 20])
def test_fourier_crop_3d_band_limited_equals_analytic_samples(n_out):
    n = 32
    kmax = n_out // 2 - 1
    rng = np.random.default_rng(100 + n_out)
    waves = [(rng.uniform(0.2, 1.0), rng.integers(-kmax, kmax + 1, size=3),
              rng.uniform(0, 2 * np.pi), n) for _ in range(5)]
    waves.append((0.5, (kmax, 0, -kmax), 1.0, n))

    def volume(size):
        c = (np.arange(size) - size // 2) * (n / size)
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        return _cosines(np.stack([x, y, z], -1), waves)

    coarse = fourier_crop_3d(torch.from_numpy(volume(n)), n_out).numpy()
    np.testing.assert_allclose(coarse, volume(n_out), rtol=0, atol=1e-10,
                               err_msg="cropped band-limited volume != analytic samples")


def test_fourier_crop_zeroes_the_new_nyquist():
    """The coarse Nyquist row/column (planes in 3D) has no partner and is left empty."""
    img = torch.from_numpy(_randn((2, 32, 32), 12))
    spec = fft2_c(fourier_crop_2d(img, 16))
    scale = spec.abs().max()
    for edge in (spec[..., 0, :], spec[..., :, 0]):
        assert edge.abs().max() < 1e-12 * scale, "2D crop left energy at the new Nyquist"
    # Everything else is the input spectrum, cropped and rescaled.
    ref = fft2_c(img)[..., 8:24, 8:24] * (16 / 32) ** 2
    torch.testing.assert_close(spec[..., 1:, 1:], ref[..., 1:, 1:], rtol=0, atol=1e-12 * scale)
    vol = torch.from_numpy(_randn((24, 24, 24), 13))
    spec3 = fft3_c(fourier_crop_3d(vol, 12))
    scale3 = spec3.abs().max()
    for plane in (spec3[0], spec3[:, 0], spec3[:, :, 0]):
        assert plane.abs().max() < 1e-12 * scale3, "3D crop left energy at the new Nyquist"
    ref3 = fft3_c(vol)[6:18, 6:18, 6:18] * (12 / 24) ** 3
    torch.testing.assert_close(spec3[1:, 1:, 1:], ref3[1:, 1:, 1:], rtol=0, atol=1e-12 * scale3)


def test_fourier_crop_identity_when_sizes_match():
    x2 = torch.from_numpy(_randn((2, 16, 16), 10))
    x3 = torch.from_numpy(_randn((16, 16, 16), 11))
    for fn, x in [(fourier_crop_2d, x2), (fourier_crop_3d, x3)]:
        y = fn(x, 16)
        assert torch.equal(y, x), f"{fn.__name__}(x, N) is not the identity"
        assert y.data_ptr() != x.data_ptr(), f"{fn.__name__}(x, N) should return a copy"
    # A spectrum that is already small (band-limited below the coarse Nyquist) survives a
    # second crop to the same size unchanged.
    once = fourier_crop_2d(x2, 8)
    torch.testing.assert_close(fourier_crop_2d(once, 8), once, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [fourier_crop_2d, fourier_crop_3d])
@pytest.mark.parametrize("n_in, n_out", [(16, 18), (16, 7), (15, 8)])
def test_fourier_crop_refuses_bad_sizes(fn, n_in, n_out):
    shape = (n_in,) * (2 if fn is fourier_crop_2d else 3)
    with pytest.raises(ValueError):
        fn(torch.zeros(shape, dtype=torch.float64), n_out)


def test_pad_and_crop_keep_centre():
    vol = torch.zeros(8, 8, 8, dtype=torch.float64)
    vol[4, 4, 4] = 1.0
    vol[1, 2, 3] = 2.0  # (x, y, z) = (-1, -2, -3)
    big = pad_volume(vol, 20)
    assert big.shape == (20, 20, 20)
    assert big[10, 10, 10] == 1.0, "pad_volume moved the centre voxel"
    assert big[10 - 3, 10 - 2, 10 - 1] == 2.0, "pad_volume moved an off-centre voxel"
    assert big.sum() == vol.sum()
    img = torch.arange(36.0).reshape(6, 6)
    cropped = crop_center_2d(img, 2)
    assert cropped[1, 1] == img[3, 3], "crop_center_2d does not keep the centre pixel N//2"
    torch.testing.assert_close(cropped, img[2:4, 2:4])
