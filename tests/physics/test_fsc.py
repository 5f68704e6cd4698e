"""Fourier shell correlation against a numpy reference and synthetic curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoai.physics.fsc import fsc, resolution_px


def _fsc_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    fa = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a)))
    fb = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(b)))
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    shell = np.rint(np.sqrt(x**2 + y**2 + z**2)).astype(int)
    out = []
    for s in range(n // 2 + 1):
        m = shell == s
        num = np.sum(fa[m] * np.conj(fb[m])).real
        out.append(num / np.sqrt(np.sum(np.abs(fa[m]) ** 2) * np.sum(np.abs(fb[m]) ** 2)))
    return np.array(out)


def _shell_counts(n):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    shell = np.rint(np.sqrt(x**2 + y**2 + z**2)).astype(int)
    return np.bincount(shell.ravel())[: n // 2 + 1]


def _smooth_volume(n, seed, sigma_k=0.12):
    """White noise filtered by exp(-|k|^2 / (2 sigma_k^2)) (k in cycles/voxel); known spectrum."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    filt = np.exp(-(kx**2 + ky**2 + kz**2) / (2 * sigma_k**2))
    return np.fft.ifftn(np.fft.fftn(rng.standard_normal((n, n, n))) * filt).real, filt


def test_fsc_with_itself_is_one():
    v = torch.from_numpy(_smooth_volume(32, 0)[0])
    curve = fsc(v, v)
    assert curve.shape == (17,)
    torch.testing.assert_close(curve, torch.ones_like(curve), rtol=0, atol=1e-12)
    torch.testing.assert_close(fsc(v, 3.0 * v), torch.ones_like(curve), rtol=0, atol=1e-12,
                               msg="FSC must be scale invariant")
    torch.testing.assert_close(fsc(v, -v), -torch.ones_like(curve), rtol=0, atol=1e-12)


def test_fsc_matches_numpy_reference():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((24, 24, 24))
    b = a + 2.0 * rng.standard_normal((24, 24, 24))
    np.testing.assert_allclose(fsc(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                               _fsc_numpy(a, b), atol=1e-12)
    # float32 input gives the same curve (computed in float64 internally).
    c32 = fsc(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    np.testing.assert_allclose(c32.numpy(), _fsc_numpy(a.astype(np.float32), b.astype(np.float32)),
                               atol=1e-6)


def test_fsc_against_independent_noise_is_near_zero():
    n = 32
    v = torch.from_numpy(_smooth_volume(n, 2, sigma_k=0.3)[0])
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal((n, n, n)))
    curve = fsc(v, noise).numpy()
    counts = _shell_counts(n)
    # Each shell holds ~count/2 independent complex samples: std ~ sqrt(1 / count).
    bound = 5 * np.sqrt(2.0 / counts)
    assert np.all(np.abs(curve[2:]) < bound[2:]), f"FSC vs noise not ~0: {curve}"


def test_fsc_with_noise_of_known_spectrum():
    """FSC(v, v + n) ~ sqrt(S / (S + N)) per shell, decreasing with the signal spectrum."""
    n, sigma_noise = 32, 0.02
    vol, _ = _smooth_volume(n, 4, sigma_k=0.08)
    noise = sigma_noise * np.random.default_rng(5).standard_normal((n, n, n))
    curve = fsc(torch.from_numpy(vol), torch.from_numpy(vol + noise)).numpy()
    fv = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    shell = np.rint(np.sqrt(x**2 + y**2 + z**2)).astype(int)
    signal = np.array([np.mean(np.abs(fv[shell == s]) ** 2) for s in range(n // 2 + 1)])
    noise_power = n**3 * sigma_noise**2  # unnormalised FFT of white noise
    expected = np.sqrt(signal / (signal + noise_power))
    assert curve[1] > 0.95 and curve[-1] < 0.3, f"curve does not span signal to noise: {curve}"
    np.testing.assert_allclose(curve[2:], expected[2:], atol=0.06,
                               err_msg="FSC differs from sqrt(S/(S+N)) of the known spectra")
    signal_shells = curve[2:10]  # from ~1 down to ~0.1, where the SNR matters
    assert np.all(np.diff(signal_shells) < 0), f"FSC is not decreasing: {curve}"


def test_fsc_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        fsc(torch.zeros(8, 8, 8), torch.zeros(8, 8, 6))
    with pytest.raises(ValueError):
        fsc(torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 8, 8))


def test_resolution_px_interpolates_between_shells():
    n = 64
    curve = torch.ones(n // 2 + 1, dtype=torch.float64)
    curve[:9] = torch.linspace(1.0, 0.6, 9, dtype=torch.float64)  # shell 8 at 0.6
    curve[9] = 0.3
    curve[10:] = 0.1
    frac = (0.6 - 0.5) / (0.6 - 0.3)
    assert resolution_px(curve) == pytest.approx(n / (8 + frac), rel=1e-12)
    # 0.143 threshold: crossing between shells 9 (0.3) and 10 (0.1).
    frac143 = (0.3 - 0.143) / (0.3 - 0.1)
    assert resolution_px(curve, 0.143) == pytest.approx(n / (9 + frac143), rel=1e-12)
    # The first crossing counts even if the curve rises again.
    bumpy = curve.clone()
    bumpy[12] = 0.9
    assert resolution_px(bumpy) == pytest.approx(n / (8 + frac), rel=1e-12)
    # Exactly on a shell: the crossing is at the previous one's interpolation end.
    step = torch.ones(n // 2 + 1, dtype=torch.float64)
    step[16:] = 0.0
    assert resolution_px(step) == pytest.approx(n / 15.5, rel=1e-12)


def test_resolution_px_nyquist():
    curve = torch.full((33,), 0.8)
    assert resolution_px(curve) == 2.0
    assert resolution_px(torch.ones(17, dtype=torch.float64), 0.143) == 2.0
