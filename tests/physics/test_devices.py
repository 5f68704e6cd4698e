"""Every physics function follows the device and dtype of its inputs (CPU and, if present, CUDA).

float32 in gives float32 / complex64 out; float64 gives float64 / complex128. On CUDA the
results are also compared with the CPU float64 results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoai.physics.ctf import compute_ctf
from cryoai.physics.fft import (
    fft2_c,
    fft3_c,
    fourier_crop_2d,
    fourier_crop_3d,
    ifft2_c,
    ifft3_c,
    pad_volume,
)
from cryoai.physics.fsc import fsc
from cryoai.physics.grids import frequency_grid_2d, grid_2d, grid_3d, radius_grid_3d
from cryoai.physics.masks import circular_mask, spherical_mask
from cryoai.physics.projection import (
    extract_central_slices,
    project_fourier,
    project_real_space,
    sample_volume,
)
from cryoai.physics.rotations import (
    euler_zyz_to_matrix,
    geodesic_distance,
    in_plane_180,
    matrix_to_euler_zyz,
    procrustes_rotation,
    random_rotations,
    rotation_6d_to_matrix,
    so3_grid,
)
from cryoai.physics.shifts import phase_shift, rotate_180, shift_images

from ._refs import DEVICES

DTYPES = [torch.float32, torch.float64]
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _randn(shape, dtype, device, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(device, dtype)


def _rots(n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return random_rotations(n, generator=gen, dtype=dtype).to(device)


def _check(t: torch.Tensor, device: str, dtype: torch.dtype, what: str):
    assert t.device.type == device, f"{what}: output on {t.device}, input on {device}"
    assert t.dtype == dtype, f"{what}: output dtype {t.dtype}, expected {dtype}"


def _close_to_cpu(t: torch.Tensor, ref: torch.Tensor, rel: float, what: str):
    err = float((t.cpu().to(ref.dtype) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    assert err < rel, f"{what}: relative difference {err:.2e} from the CPU float64 result"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fft_family(device, dtype):
    img = _randn((2, 16, 16), dtype, device)
    vol = _randn((16, 16, 16), dtype, device)
    cdt = COMPLEX[dtype]
    for name, out in [("fft2_c", fft2_c(img)), ("ifft2_c", ifft2_c(img)),
                      ("fft3_c", fft3_c(vol)), ("ifft3_c", ifft3_c(vol))]:
        _check(out, device, cdt, name)
    _check(fourier_crop_2d(img, 8), device, dtype, "fourier_crop_2d")
    _check(fourier_crop_3d(vol, 8), device, dtype, "fourier_crop_3d")
    _check(pad_volume(vol, 20), device, dtype, "pad_volume")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _close_to_cpu(fourier_crop_2d(img, 8), fourier_crop_2d(img.cpu().double(), 8), tol,
                  "fourier_crop_2d")
    _close_to_cpu(fft3_c(vol), fft3_c(vol.cpu().double()), tol, "fft3_c")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_grids_and_masks(device, dtype):
    for name, out in [("grid_2d", grid_2d(8, device=device, dtype=dtype)),
                      ("grid_3d", grid_3d(8, device=device, dtype=dtype)),
                      ("frequency_grid_2d", frequency_grid_2d(8, 1.5, device=device, dtype=dtype)),
                      ("radius_grid_3d", radius_grid_3d(8, device=device, dtype=dtype)),
                      ("circular_mask", circular_mask(8, 3.0, soft_edge_px=2.0, device=device,
                                                      dtype=dtype)),
                      ("spherical_mask", spherical_mask(8, device=device, dtype=dtype))]:
        _check(out, device, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotations(device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    r = random_rotations(6, generator=gen, device=device, dtype=dtype)
    _check(r, device, dtype, "random_rotations")
    _check(so3_grid(100, device=device, dtype=dtype), device, dtype, "so3_grid")
    angles = _randn((6, 3), dtype, device)
    _check(euler_zyz_to_matrix(angles), device, dtype, "euler_zyz_to_matrix")
    _check(matrix_to_euler_zyz(r), device, dtype, "matrix_to_euler_zyz")
    _check(rotation_6d_to_matrix(_randn((6, 6), dtype, device)), device, dtype,
           "rotation_6d_to_matrix")
    _check(geodesic_distance(r, r.flip(0)), device, dtype, "geodesic_distance")
    _check(in_plane_180(r), device, dtype, "in_plane_180")
    _check(procrustes_rotation(r, r.flip(0)), device, dtype, "procrustes_rotation")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _close_to_cpu(euler_zyz_to_matrix(angles), euler_zyz_to_matrix(angles.cpu().double()), tol,
                  "euler_zyz_to_matrix")


@pytest.mark.parametrize("device", DEVICES)
def test_random_rotations_cpu_generator_any_device(device):
    """A CPU generator drives sampling for any output device, with the same rotations."""
    ref = random_rotations(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = random_rotations(8, generator=torch.Generator().manual_seed(3), device=device,
                           dtype=torch.float32)
    _check(out, device, torch.float32, "random_rotations (CPU generator)")
    _close_to_cpu(out, ref, 1e-6, "random_rotations (CPU generator)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_ctf_and_shifts(device, dtype):
    freqs = frequency_grid_2d(16, 1.5, device=device, dtype=dtype)
    du = torch.tensor([15000.0, 20000.0], device=device, dtype=dtype)
    ctf = compute_ctf(freqs, du, 14000.0, 0.3, 300.0, 2.7, 0.1, 0.2, 50.0)
    _check(ctf, device, dtype, "compute_ctf (batched)")
    _check(compute_ctf(freqs, 15000.0, 14000.0, 0.3, 300.0, 2.7, 0.1), device, dtype,
           "compute_ctf (scalars)")
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    ref = compute_ctf(freqs.cpu().double(), du.cpu().double(), 14000.0, 0.3, 300.0, 2.7, 0.1,
                      0.2, 50.0)
    _close_to_cpu(ctf, ref, tol, "compute_ctf")
    shifts = torch.tensor([[1.5, -2.0], [0.0, 3.25]], device=device, dtype=dtype)
    _check(phase_shift(freqs, shifts), device, COMPLEX[dtype], "phase_shift")
    imgs = _randn((2, 16, 16), dtype, device)
    _check(shift_images(imgs, shifts), device, dtype, "shift_images")
    _check(rotate_180(imgs), device, dtype, "rotate_180")
    _close_to_cpu(shift_images(imgs, shifts),
                  shift_images(imgs.cpu().double(), shifts.cpu().double()),
                  1e-5 if dtype == torch.float32 else 1e-12, "shift_images")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_projection(device, dtype):
    vol = _randn((16, 16, 16), dtype, device)
    rots = _rots(3, dtype, device)
    pts = _randn((5, 3), dtype, device)
    _check(sample_volume(vol, pts), device, dtype, "sample_volume (real)")
    fvol = fft3_c(vol)
    _check(sample_volume(fvol, pts), device, COMPLEX[dtype], "sample_volume (complex)")
    _check(extract_central_slices(fvol, rots), device, COMPLEX[dtype], "extract_central_slices")
    pf = project_fourier(vol, rots)
    _check(pf, device, dtype, "project_fourier")
    _check(project_real_space(vol, rots), device, dtype, "project_real_space")
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    _close_to_cpu(pf, project_fourier(vol.cpu().double(), rots.cpu().double()), tol,
                  "project_fourier")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fsc_device(device, dtype):
    """fsc stays on the input device; it always computes and returns float64 (a metric)."""
    a, b = _randn((16, 16, 16), dtype, device, 1), _randn((16, 16, 16), dtype, device, 2)
    curve = fsc(a, b)
    assert curve.device.type == device and curve.dtype == torch.float64 and curve.shape == (9,)
    _close_to_cpu(curve, fsc(a.cpu().double(), b.cpu().double()),
                  1e-5 if dtype == torch.float32 else 1e-12, "fsc")
