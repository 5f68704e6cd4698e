"""Agreement with ASPIRE, a peer package: its simulated 70S sets read through ``cryoai.io`` and
match cryoai's own forward model (the one ``cryoai simulate`` uses) at the poses in the STAR.

Data: ``aspire-70s/`` of the shared data (see its README): ASPIRE 0.14.3, box 64, 5 A/px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryoai.io import ImageSource, load_particles, read_volume
from cryoai.physics.ctf import compute_ctf
from cryoai.physics.fft import fft2_c, ifft2_c
from cryoai.physics.grids import frequency_grid_2d
from cryoai.physics.projection import project_fourier
from cryoai.physics.shifts import phase_shift

N_COMPARED = 32


def aspire_set(shared_data: Path, name: str) -> Path:
    d = shared_data / "aspire-70s" / name
    if not (d / "particles.star").is_file():
        pytest.skip(f"ASPIRE data set not found at {d}")
    return d


def forward_model(volume: np.ndarray, table, idx: np.ndarray) -> np.ndarray:
    """``CTF * F_proj(R) * exp(-2 pi i k . shift)``, as in ``simulate.simulator._Renderer``."""
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

    proj = project_fourier(t(volume), t(table.rotations[idx]), oversample=2)
    freqs = frequency_grid_2d(table.box_px, float(table.pixel_size_a[0]), dtype=torch.float64)
    ctf_params = {k: t(v) for k, v in table.ctf_arrays(idx).items()}
    ctf = compute_ctf(freqs, **ctf_params)
    spec = fft2_c(proj) * ctf * phase_shift(freqs, t(table.shifts_a[idx]))
    return ifft2_c(spec).real.numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_noise_free_set_matches_cryoai_forward_model(shared_data):
    d = aspire_set(shared_data, "noise-free")
    table = load_particles(d / "particles.star")
    assert len(table) == 1000 and table.box_px == 64
    np.testing.assert_allclose(table.pixel_size_a, 5.0)
    np.testing.assert_allclose(table.voltage_kv, 300.0)
    np.testing.assert_allclose(table.cs_mm, 2.7)
    np.testing.assert_allclose(table.amplitude_contrast, 0.1)
    assert table.has_poses and table.has_shifts
    ImageSource(table).validate()

    # ASPIRE's own arrays: its rotations are ours; its offsets (pixels) are RELION origins,
    # so our shift is minus them (CONVENTIONS.md, Shifts).
    rot_npy, off_npy = d / "gt_rotations.npy", d / "gt_offsets_px.npy"
    if rot_npy.is_file() and off_npy.is_file():
        np.testing.assert_allclose(table.rotations, np.load(rot_npy), atol=1e-6)
        np.testing.assert_allclose(table.shifts_a, -5.0 * np.load(off_npy), atol=1e-4)

    volume, _ = read_volume(d / "ground_truth.mrc")
    assert volume.shape == (64, 64, 64)
    idx = np.arange(N_COMPARED)
    images = ImageSource(table).read(idx).astype(np.float64)
    predicted = forward_model(volume, table, idx)
    corr = [correlation(predicted[i], images[i]) for i in range(N_COMPARED)]
    assert min(corr) > 0.99, np.round(corr, 4)  # 0.999 measured
    # Control: an image does not match its neighbour's parameters.
    wrong = [correlation(predicted[i], images[(i + 1) % N_COMPARED]) for i in range(N_COMPARED)]
    assert max(wrong) < 0.8, np.round(wrong, 3)


def test_noisy_set_loads(shared_data):
    d = aspire_set(shared_data, "snr0.1")
    table = load_particles(d / "particles.star")
    assert len(table) == 5000 and table.box_px == 64
    np.testing.assert_allclose(table.pixel_size_a, 5.0)
    assert table.has_poses and table.has_shifts
    source = ImageSource(table)
    source.validate()
    images = source.read([0, 4999])
    assert images.shape == (2, 64, 64) and np.isfinite(images).all() and images.std() > 0
