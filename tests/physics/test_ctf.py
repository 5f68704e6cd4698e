"""CTF against a direct numpy transcription of CONVENTIONS.md and physical constants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import constants

from cryoai.physics.ctf import compute_ctf, electron_wavelength_a


def _ctf_numpy(kx, ky, du, dv, ang, kv, cs_mm, w, phase=0.0, bfac=0.0):
    """CONVENTIONS.md, written out with numpy (scalar parameters)."""
    volts = kv * 1e3
    lam = 12.2639 / np.sqrt(volts + 0.97845e-6 * volts**2)
    s2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (theta - ang))
    cs_a = cs_mm * 1e7
    chi = np.pi * lam * defocus * s2 - 0.5 * np.pi * cs_a * lam**3 * s2**2 + phase
    return -(np.sqrt(1 - w**2) * np.sin(chi) + w * np.cos(chi)) * np.exp(-bfac * s2 / 4)


def _freq_grid(n: int, pixel_a: float) -> np.ndarray:
    f = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_a))
    ky, kx = np.meshgrid(f, f, indexing="ij")
    return np.stack([kx, ky], -1)


def _random_params(b: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        du=rng.uniform(5000, 30000, b),
        dv=rng.uniform(5000, 30000, b),
        ang=rng.uniform(-np.pi, np.pi, b),
        kv=rng.choice([200.0, 300.0], b),
        cs_mm=rng.uniform(0.01, 2.7, b),
        w=rng.uniform(0.0, 0.3, b),
        phase=rng.uniform(0, np.pi, b),
        bfac=rng.uniform(0, 200, b),
    )


_ORDER = ["du", "dv", "ang", "kv", "cs_mm", "w", "phase", "bfac"]


@pytest.mark.parametrize("kv, expected", [(300.0, 0.019687), (200.0, 0.025079), (100.0, 0.037014)])
def test_electron_wavelength(kv, expected):
    lam = electron_wavelength_a(kv)
    assert isinstance(lam, float)
    assert abs(lam - expected) < 1e-5, f"lambda({kv} kV) = {lam}, expected {expected}"
    # Independent reference: relativistic de Broglie wavelength from CODATA constants.
    ev = constants.e * kv * 1e3
    p = math.sqrt(2 * constants.m_e * ev * (1 + ev / (2 * constants.m_e * constants.c**2)))
    assert abs(lam - constants.h / p * 1e10) / lam < 1e-4
    t = electron_wavelength_a(torch.tensor([kv], dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and abs(float(t[0]) - lam) < 1e-15


def test_compute_ctf_uses_the_documented_wavelength():
    """With w = 0, Cs = 0, no astigmatism: CTF = -sin(pi lambda d s^2), lambda from CONVENTIONS.md."""
    freqs = _freq_grid(32, 1.1)
    s2 = (freqs**2).sum(-1)
    d = 15000.0
    for kv in (300.0, 120.0):
        volts = kv * 1e3
        lam = 12.2639 / math.sqrt(volts + 0.97845e-6 * volts**2)
        assert electron_wavelength_a(kv) == pytest.approx(lam, rel=1e-15)
        ours = compute_ctf(torch.from_numpy(freqs), d, d, 0.3, kv, 0.0, 0.0).numpy()
        np.testing.assert_allclose(ours, -np.sin(np.pi * lam * d * s2), rtol=0, atol=1e-12,
                                   err_msg=f"compute_ctf's wavelength at {kv} kV is not the documented one")
        # The check is sensitive: the non-relativistic wavelength is far off.
        lam_nr = 12.2639 / math.sqrt(volts)
        assert np.abs(ours + np.sin(np.pi * lam_nr * d * s2)).max() > 1e-3
    # Batched voltages (tensor path) give the same per-voltage wavelength.
    kv_t = torch.tensor([300.0, 120.0], dtype=torch.float64)
    both = compute_ctf(torch.from_numpy(freqs), d, d, 0.3, kv_t, 0.0, 0.0).numpy()
    lam_t = electron_wavelength_a(kv_t).numpy()
    for i in range(2):
        np.testing.assert_allclose(both[i], -np.sin(np.pi * lam_t[i] * d * s2), rtol=0, atol=1e-12)


def test_ctf_matches_formula_unbatched():
    freqs = _freq_grid(64, 1.3)
    p = {k: float(v[0]) for k, v in _random_params(1, 0).items()}
    ours = compute_ctf(torch.from_numpy(freqs), p["du"], p["dv"], p["ang"], p["kv"], p["cs_mm"],
                       p["w"], p["phase"], p["bfac"])
    assert ours.shape == (64, 64)
    ref = _ctf_numpy(freqs[..., 0], freqs[..., 1], *(p[k] for k in _ORDER))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-10,
                               err_msg="compute_ctf != CONVENTIONS.md formula")


def test_ctf_batched_matches_formula_and_unbatched():
    b = 5
    freqs = _freq_grid(48, 1.7)
    ft = torch.from_numpy(freqs)
    prm = _random_params(b, 1)
    batched = compute_ctf(ft, *(torch.from_numpy(prm[k]) for k in _ORDER))
    assert batched.shape == (b, 48, 48)
    for i in range(b):
        vals = [float(prm[k][i]) for k in _ORDER]
        ref = _ctf_numpy(freqs[..., 0], freqs[..., 1], *vals)
        np.testing.assert_allclose(batched[i].numpy(), ref, rtol=0, atol=1e-10,
                                   err_msg=f"batched CTF {i} != formula")
        single = compute_ctf(ft, *vals)
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-12,
                                   msg="batched and unbatched CTFs disagree")
    # Mixed: some parameters batched, the others scalars; (M, 2) frequency lists.
    pts = ft.reshape(-1, 2)[::7]
    mixed = compute_ctf(pts, torch.from_numpy(prm["du"]), 12000.0, 0.3, 300.0,
                        torch.from_numpy(prm["cs_mm"]), 0.07)
    assert mixed.shape == (b, pts.shape[0])
    for i in range(b):
        ref = _ctf_numpy(pts[:, 0].numpy(), pts[:, 1].numpy(), prm["du"][i], 12000.0, 0.3,
                         300.0, prm["cs_mm"][i], 0.07)
        np.testing.assert_allclose(mixed[i].numpy(), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("w", [0.0, 0.07, 0.1, 0.3])
@pytest.mark.parametrize("phase", [0.0, 0.5 * math.pi, 1.0])
def test_ctf_at_zero_frequency(w, phase):
    zero = torch.zeros(1, 2, dtype=torch.float64)
    value = float(compute_ctf(zero, 15000.0, 12000.0, 0.4, 300.0, 2.7, w, phase, 100.0)[0])
    expected = -(math.sqrt(1 - w * w) * math.sin(phase) + w * math.cos(phase))
    assert abs(value - expected) < 1e-14, f"CTF(0) = {value}, expected {expected}"
    if phase == 0.0:
        assert abs(value + w) < 1e-14, "CTF(0) must equal -w without phase plate"


def test_ctf_bfactor_envelope():
    freqs = torch.from_numpy(_freq_grid(32, 2.0))
    args = (18000.0, 16000.0, 0.2, 300.0, 2.7, 0.1, 0.3)
    plain = compute_ctf(freqs, *args)
    damped = compute_ctf(freqs, *args, 150.0)
    s2 = (freqs**2).sum(-1)
    torch.testing.assert_close(damped, plain * torch.exp(-150.0 * s2 / 4), rtol=0, atol=1e-14)
    assert damped.abs().max() <= 1.0 + 1e-12 and plain.abs().max() <= 1.0 + 1e-12


def _zeros_along_ray(theta, smax, n_samples, **kw):
    """Radii (1/A) where the CTF changes sign along direction theta (linear interpolation)."""
    s = np.linspace(1e-4, smax, n_samples)
    pts = torch.from_numpy(np.stack([s * np.cos(theta), s * np.sin(theta)], -1))
    c = compute_ctf(pts, kw["du"], kw["dv"], kw["ang"], kw["kv"], kw["cs_mm"], kw["w"]).numpy()
    i = np.nonzero(np.sign(c[:-1]) != np.sign(c[1:]))[0]
    return s[i] - c[i] * (s[i + 1] - s[i]) / (c[i + 1] - c[i])


def _zeros_1d(defocus, kv, cs_mm, w, count):
    """Analytic zeros of -sin(chi + asin w), chi = pi lam d s^2 - pi/2 Cs lam^3 s^4."""
    volts = kv * 1e3
    lam = 12.2639 / math.sqrt(volts + 0.97845e-6 * volts**2)
    cs = cs_mm * 1e7
    alpha = math.asin(w)
    a, b = 0.5 * math.pi * cs * lam**3, math.pi * lam * defocus
    out = []
    for k in range(1, count + 1):
        c = k * math.pi - alpha
        u = (b - math.sqrt(b * b - 4 * a * c)) / (2 * a)  # smaller root in s^2
        out.append(math.sqrt(u))
    return np.array(out)


@pytest.mark.parametrize("ang", [0.0, 0.7, -2.0])
def test_ctf_astigmatism_axes(ang):
    """Along theta = angle the defocus is dU; perpendicular to it, dV (zeros of the CTF)."""
    kw = dict(du=21000.0, dv=14000.0, ang=ang, kv=300.0, cs_mm=2.7, w=0.1)
    for theta, defocus in [(ang, kw["du"]), (ang + math.pi, kw["du"]),
                           (ang + math.pi / 2, kw["dv"]), (ang - math.pi / 2, kw["dv"])]:
        found = _zeros_along_ray(theta, 0.25, 250001, **kw)
        expected = _zeros_1d(defocus, kw["kv"], kw["cs_mm"], kw["w"], 10)
        assert len(found) >= 10, "too few CTF zeros along the ray"
        np.testing.assert_allclose(found[:10], expected, rtol=1e-6,
                                   err_msg=f"CTF zeros along theta={theta:.3f} do not match "
                                           f"defocus {defocus}")
    # The two axes really differ (the check above has power).
    assert abs(_zeros_1d(21000.0, 300.0, 2.7, 0.1, 1)[0]
               - _zeros_1d(14000.0, 300.0, 2.7, 0.1, 1)[0]) > 1e-3


def test_ctf_float32_follows_dtype():
    freqs = torch.from_numpy(_freq_grid(32, 1.5)).float()
    out = compute_ctf(freqs, torch.tensor([15000.0, 9000.0]), 12000.0, 0.3, 300.0, 2.7, 0.1)
    assert out.dtype == torch.float32 and out.shape == (2, 32, 32)
    ref = compute_ctf(freqs.double(), torch.tensor([15000.0, 9000.0], dtype=torch.float64),
                      12000.0, 0.3, 300.0, 2.7, 0.1)
    assert (out.double() - ref).abs().max() < 1e-3
