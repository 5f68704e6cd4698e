"""Projection: Fourier slice vs real-space line integrals, analytic Gaussians, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryoai.physics.fft import fft3_c
from cryoai.physics.projection import (
    extract_central_slices,
    project_fourier,
    project_real_space,
    sample_volume,
    slice_coords,
)

from ._refs import gaussian_image, gaussian_volume

F64 = torch.float64


def _rotations(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(Rotation.random(n, random_state=seed).as_matrix())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_fourier_and_real_space_projectors_agree_on_ribosome(ribosome):
    rots = _rotations(5, 0)
    fourier = project_fourier(ribosome, rots, oversample=2)
    real = project_real_space(ribosome, rots)
    assert fourier.shape == real.shape == (5, 64, 64)
    for i in range(5):
        c = _corr(fourier[i], real[i])
        assert c > 0.99, f"rotation {i}: Fourier/real-space projection correlation {c:.4f}"


def test_identity_pose_is_sum_along_z(ribosome):
    """For R = I both projectors are exactly volume.sum(0) (integer sample points)."""
    eye = torch.eye(3, dtype=F64)[None]
    ref = ribosome.sum(0)
    scale = ref.abs().max()
    torch.testing.assert_close(project_real_space(ribosome, eye)[0], ref, rtol=0,
                               atol=1e-12 * scale)
    torch.testing.assert_close(project_fourier(ribosome, eye, oversample=2)[0], ref, rtol=0,
                               atol=1e-10 * scale)
    torch.testing.assert_close(project_fourier(ribosome, eye, oversample=1)[0], ref, rtol=0,
                               atol=1e-10 * scale)


def test_quarter_turn_about_z_rotates_the_image():
    """R = Rz(90 deg): image(x, y) = P(R[:2,:2] (x, y)) = P(-y, x), P = sum_z V.

    The blobs are wide enough (sigma >= 2.5 px) to have no energy at Nyquist, which the
    Fourier projector cannot rotate (its partner lies outside the box).
    """
    n = 40
    vol = gaussian_volume(n, (5.0, -3.0, 2.0), 2.5) + 0.5 * gaussian_volume(n, (-4.0, 6.0, -1.0),
                                                                             3.0)
    rz = torch.from_numpy(Rotation.from_euler("z", 90, degrees=True).as_matrix())[None]
    p = vol.sum(0).numpy()
    c = n // 2
    ref = np.zeros_like(p)
    for iy in range(n):
        for ix in range(n):
            x, y = ix - c, iy - c
            sx, sy = -y, x  # source position (x', y') = (-y, x)
            if 0 <= sy + c < n and 0 <= sx + c < n:
                ref[iy, ix] = p[sy + c, sx + c]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(project_real_space(vol, rz)[0].numpy(), ref, atol=1e-9 * scale,
                               err_msg="real-space projector: wrong in-plane rotation sense")
    np.testing.assert_allclose(project_fourier(vol, rz)[0].numpy(), ref, atol=1e-9 * scale,
                               err_msg="Fourier projector: wrong in-plane rotation sense")


def test_gaussian_blob_projects_to_rt_p():
    """A blob at volume position p appears at image position (R^T p)[:2] (not (R p)[:2])."""
    n, sigma = 48, 2.5
    p = np.array([5.0, -3.0, 7.0])
    vol = gaussian_volume(n, p, sigma)
    mats = Rotation.random(40, random_state=1).as_matrix()
    # Keep poses for which R^T p and R p are clearly distinguishable in the image.
    keep = [m for m in mats if np.linalg.norm((m.T @ p)[:2] - (m @ p)[:2]) > 3.0][:5]
    assert len(keep) == 5
    rots = torch.from_numpy(np.stack(keep))
    real = project_real_space(vol, rots).numpy()
    fourier = project_fourier(vol, rots, oversample=2).numpy()
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    for i, r in enumerate(keep):
        q = (r.T @ p)[:2]
        wrong = (r @ p)[:2]
        analytic = gaussian_image(n, q, sigma, amplitude=math.sqrt(2 * math.pi) * sigma)
        for name, img, tol_amp, tol_pos in [("real-space", real[i], 0.04, 0.01),
                                            ("Fourier", fourier[i], 0.05, 0.3)]:
            err = np.abs(img - analytic).max() / analytic.max()
            assert err < tol_amp, f"{name} projection {i} differs from the analytic Gaussian " \
                                  f"by {err:.3f} of its peak"
            centroid = np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
            assert np.linalg.norm(centroid - q) < tol_pos, (
                f"{name} projection {i}: blob at {centroid}, expected (R^T p)[:2] = {q}")
            assert np.linalg.norm(centroid - wrong) > 2.0


def test_centre_voxel_stays_at_centre():
    n = 32
    c = n // 2
    delta = torch.zeros(n, n, n, dtype=F64)
    delta[c, c, c] = 1.0
    blob = gaussian_volume(n, (0.0, 0.0, 0.0), 1.5)
    rots = _rotations(5, 2)
    yy, xx = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    for vol in (delta, blob):
        for proj in (project_real_space(vol, rots), project_fourier(vol, rots)):
            for img in proj.numpy():
                assert np.unravel_index(np.argmax(img), img.shape) == (c, c), \
                    "the centre voxel is not projected to pixel (N//2, N//2)"
        for img in project_real_space(vol, rots).numpy():
            centroid = np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
            assert np.abs(centroid).max() < 1e-9, f"centroid {centroid} is not at the centre"


def test_sample_volume_at_integer_points_returns_voxels():
    n = 10
    rng = np.random.default_rng(3)
    vol = torch.from_numpy(rng.standard_normal((n, n, n)))
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = torch.from_numpy(np.stack([x, y, z], -1).astype(np.float64))
    torch.testing.assert_close(sample_volume(vol, pts), vol, rtol=0, atol=1e-12,
                               msg="sample_volume at voxel centres != voxel values")
    # Complex volumes, arbitrary leading shape.
    cvol = torch.complex(vol, torch.from_numpy(rng.standard_normal((n, n, n))))
    idx = rng.integers(0, n, size=(4, 6, 3))  # (ix, iy, iz)
    out = sample_volume(cvol, torch.from_numpy((idx - n // 2).astype(np.float64)))
    assert out.shape == (4, 6) and out.is_complex()
    torch.testing.assert_close(out, cvol[idx[..., 2], idx[..., 1], idx[..., 0]], rtol=0,
                               atol=1e-12)


def test_sample_volume_is_trilinear_and_zero_outside():
    n = 12
    rng = np.random.default_rng(4)
    vol = rng.standard_normal((n, n, n))
    pts = rng.uniform(-n // 2, n // 2 - 1, size=(500, 3))  # inside the box
    ours = sample_volume(torch.from_numpy(vol), torch.from_numpy(pts)).numpy()
    idx = (pts + n // 2)[:, ::-1].T  # (z, y, x) index coordinates
    ref = ndimage.map_coordinates(vol, idx, order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(ours, ref, atol=1e-12, err_msg="sample_volume != trilinear")
    outside = torch.tensor([[n, 0.0, 0.0], [0.0, -n, 0.0], [0.0, 0.0, n / 2 + 1.5]], dtype=F64)
    assert torch.equal(sample_volume(torch.from_numpy(vol), outside), torch.zeros(3, dtype=F64))


def test_slice_coords():
    rots = _rotations(4, 5)
    g = torch.from_numpy(np.random.default_rng(6).standard_normal((7, 2)))
    out = slice_coords(rots, g)
    assert out.shape == (4, 7, 3)
    k3 = np.concatenate([g.numpy(), np.zeros((7, 1))], axis=1)
    ref = np.einsum("bij,mj->bmi", rots.numpy(), k3)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-14, err_msg="slice_coords != R @ (k, 0)")
    grid = torch.from_numpy(np.random.default_rng(7).standard_normal((5, 5, 2)))
    assert slice_coords(rots, grid).shape == (4, 5, 5, 3)


def test_central_slice_of_gaussian_matches_analytic_spectrum():
    """Fourier slice theorem through extract_central_slices on an analytic spectrum.

    A centred Gaussian of width sigma has the (continuous) transform
    (2 pi sigma^2)^(3/2) exp(-2 pi^2 sigma^2 |k|^2); its slice is the 2D one for every R.
    """
    n, sigma = 32, 1.5
    fvol = fft3_c(gaussian_volume(n, (0.0, 0.0, 0.0), sigma))
    rots = _rotations(3, 8)
    slices = extract_central_slices(fvol, rots).numpy()
    c = np.arange(n) - n // 2
    ky, kx = np.meshgrid(c / n, c / n, indexing="ij")
    k2 = kx**2 + ky**2
    analytic = (2 * math.pi * sigma**2) ** 1.5 * np.exp(-2 * math.pi**2 * sigma**2 * k2)
    for s in slices:
        assert np.abs(s.imag).max() < 1e-9 * analytic.max()
        # Trilinear interpolation of a smooth spectrum: a few percent of the peak.
        assert np.abs(s.real - analytic).max() < 0.03 * analytic.max()


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_chunking_does_not_change_results(chunk):
    vol = gaussian_volume(16, (2.0, 1.0, -3.0), 2.0)
    rots = _rotations(5, 9)
    torch.testing.assert_close(project_fourier(vol, rots, chunk=chunk),
                               project_fourier(vol, rots), rtol=0, atol=1e-12)
    torch.testing.assert_close(project_real_space(vol, rots, chunk=chunk),
                               project_real_space(vol, rots), rtol=0, atol=1e-12)
    assert project_fourier(vol, rots[:0]).shape == (0, 16, 16)


def test_sample_planes_at_rotated_frequencies_is_the_spectrum_of_the_rotated_image():
    """Reading a spectrum at ``R(a) q`` gives the spectrum of the image ``x -> img(R(a) x)``
    (reference: the image rotated in real space by cubic spline interpolation)."""
    from cryoai.physics.fft import fft2_c
    from cryoai.physics.grids import grid_2d
    from cryoai.physics.projection import inplane_rotations, sample_planes

    n, angle = 96, 0.7
    g = grid_2d(n, dtype=F64)
    img = torch.exp(-((g[..., 0] - 1) ** 2 / 4 + (g[..., 1] + 0.5) ** 2 / 9))  # small and central
    pts = inplane_rotations(torch.tensor([angle], dtype=F64), g.reshape(-1, 2))[0]
    got = sample_planes((fft2_c(img) / n)[None], pts)[0].reshape(n, n)
    rotated = ndimage.map_coordinates(img.numpy(), [pts[:, 1].numpy() + n // 2, pts[:, 0].numpy() + n // 2],
                                      order=3).reshape(n, n)
    want = fft2_c(torch.from_numpy(rotated)) / n
    low = g.norm(dim=-1) <= 6
    err = float((got - want)[low].abs().max() / want[low].abs().max())
    assert err < 0.01, err  # bilinear interpolation of a smooth spectrum (measured 0.0037)
    wrong = sample_planes((fft2_c(img) / n)[None], inplane_rotations(torch.tensor([-angle], dtype=F64),
                                                                     g.reshape(-1, 2))[0])[0].reshape(n, n)
    assert float((wrong - want)[low].abs().max() / want[low].abs().max()) > 0.2  # the sense matters


def test_insert_planes_is_the_adjoint_of_sample_planes():
    """<sample(A), v> = <A, insert(v)> / 2 for Hermitian A (insertion also puts conj(v) at -q)."""
    from cryoai.physics.backprojection import insert_planes
    from cryoai.physics.fft import fft2_c
    from cryoai.physics.projection import sample_planes

    gen = torch.Generator().manual_seed(0)
    n = 32
    planes = fft2_c(torch.randn(3, n, n, dtype=F64, generator=gen))
    values = torch.randn(3, 60, dtype=torch.complex128, generator=gen)
    points = torch.randn(60, 2, dtype=F64, generator=gen) * 4
    lhs = 2 * float((sample_planes(planes, points).conj() * values).real.sum())
    num, den = insert_planes(values, torch.ones(3, 60, dtype=F64), points, n)
    assert lhs == pytest.approx(float((planes.conj() * num).real.sum()), rel=1e-10)
    assert float(den.sum()) == pytest.approx(2 * 3 * 60, rel=1e-10)  # every weight twice, whole


def test_trilinear_insertion_weighs_the_map_by_the_kernel_and_the_correction_undoes_it():
    """Slices of a blob's exact transform (analytic: a Gaussian at ``p``) inserted trilinearly at
    many rotations (numerator over the weights' sum, as the reconstruction does) give the blob
    weighed by ``trilinear_weight`` at ``p`` (0.75 here, as the issue measured off centre);
    ``gridding_corrected`` restores its height. The decoder's side is the inverse.
    """
    import math

    from cryoai.physics.backprojection import insert_slices
    from cryoai.physics.fft import ifft3_c
    from cryoai.physics.grids import grid_2d, grid_3d
    from cryoai.physics.projection import gridding_corrected, slice_coords, trilinear_weight
    from cryoai.physics.rotations import random_rotations

    n, sigma = 32, 1.5
    centre = torch.tensor([7.0, -5.0, 4.0], dtype=torch.float64)  # (x, y, z) px from the centre
    g = grid_3d(n, dtype=torch.float64)
    blob = torch.exp(-((g - centre) ** 2).sum(-1) / (2 * sigma**2))

    def transform(k):  # the blob's continuous transform at frequencies k (..., 3) in cycles per box
        amp = (2 * math.pi * sigma**2) ** 1.5 * torch.exp(-2 * math.pi**2 * sigma**2 * (k**2).sum(-1) / n**2)
        return amp * torch.exp(-2j * math.pi * (k * centre).sum(-1) / n)

    # the analytic transform is fft3_c's on the grid (the convention the test relies on)
    ref = fft3_c(blob.to(torch.complex128))
    torch.testing.assert_close(transform(g.to(torch.complex128)), ref, atol=1e-4 * float(ref.abs().max()),
                               rtol=0)
    rot = random_rotations(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pts = slice_coords(rot, grid_2d(n, dtype=torch.float64).reshape(-1, 2))  # (R, P, 3)
    num, den = insert_slices(transform(pts), torch.ones(pts.shape[:-1], dtype=torch.float64), pts, n)
    rec = ifft3_c(torch.where(den > 1e-3, num / den.clamp_min(1e-3), 0)).real
    at = (n // 2 + 4, n // 2 - 5, n // 2 + 7)  # [z, y, x] of the blob's centre
    w = float(trilinear_weight(n, dtype=torch.float64)[at])
    sincs = [(math.sin(math.pi * c / n) / (math.pi * c / n)) ** 2 for c in (7, 5, 4)]
    assert w == pytest.approx(math.prod(sincs), rel=1e-9) and w < 0.8
    assert float(rec[at]) == pytest.approx(w, rel=0.04)  # the blob's height (1) weighed
    assert float(gridding_corrected(rec)[at]) == pytest.approx(1.0, rel=0.04)
    torch.testing.assert_close(gridding_corrected(gridding_corrected(blob), fitted=True), blob)
