"""Physics identities of the default ab initio path (``cryoai.reconstruction``) against
independent references written here: brute-force sums and loops, analytic Fourier transforms
of Gaussian blobs, explicit trilinear weights.

Each test is small (boxes of 16 to 24) and runs in well under 5 s on one core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoai.models.image_formation import ImageFormation
from cryoai.physics.backprojection import insert_slices
from cryoai.physics.ctf import compute_ctf
from cryoai.physics.fft import fft3_c, ifft3_c
from cryoai.physics.grids import grid_2d, grid_3d, radius_grid_3d
from cryoai.physics.projection import project_real_space, sample_volume
from cryoai.physics.rotations import geodesic_distance, random_rotations, so3_grid
from cryoai.reconstruction import em
from cryoai.reconstruction.backproject import backproject
from cryoai.reconstruction.pose_search import centre_of_mass
from cryoai.reconstruction.regularised import regularised_solve

# ---------------------------------------------------------------------------------------------
# Independent references


def _phase(freqs_px: torch.Tensor, shift_px) -> torch.Tensor:
    """exp(-2 pi i k . s) for one shift (CONVENTIONS.md: moves the image content by +s)."""
    s = torch.as_tensor(shift_px, dtype=freqs_px.dtype)
    return torch.exp(-2j * math.pi * (freqs_px[:, 0] * s[0] + freqs_px[:, 1] * s[1]))


def _rotate_plane(rotations: torch.Tensor, coords_2d: torch.Tensor) -> torch.Tensor:
    """R @ (kx, ky, 0) written out as a matrix product, (B, M, 3)."""
    k3 = torch.cat([coords_2d, torch.zeros(len(coords_2d), 1, dtype=coords_2d.dtype)], dim=-1)
    return torch.einsum("bij,mj->bmi", rotations.to(coords_2d.dtype), k3)


def _trilinear_scatter(points: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Reference trilinear insertion (one point at a time via np.add.at), [z, y, x] grid."""
    out = np.zeros((n, n, n), dtype=values.dtype)
    idx = points + n // 2
    for p, v in zip(idx, values, strict=True):
        b = np.floor(p).astype(int)
        f = p - b
        for corner in np.ndindex(2, 2, 2):  # (dx, dy, dz)
            c = b + np.array(corner)
            w = np.prod([f[a] if corner[a] else 1 - f[a] for a in range(3)])
            if np.all(c >= 0) and np.all(c < n):
                out[c[2], c[1], c[0]] += w * v
    return out


def _blobs(n: int, centres_px, sigmas_px, amps) -> torch.Tensor:
    """Real volume (n, n, n) [z, y, x], a sum of Gaussians at (x, y, z) pixels from the centre."""
    g = grid_3d(n, dtype=torch.float64)
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for c, s, a in zip(centres_px, sigmas_px, amps, strict=True):
        d2 = ((g - torch.tensor(c, dtype=torch.float64)) ** 2).sum(-1)
        vol += a * torch.exp(-d2 / (2 * s * s))
    return vol


def _blobs_ft(k_px: torch.Tensor, n: int, centres_px, sigmas_px, amps) -> torch.Tensor:
    """Analytic continuous Fourier transform of :func:`_blobs` at frequencies ``k_px`` (..., 3)
    (cycles per box), in the decoders' 1/N scale: the exact central-slice values."""
    k = k_px.to(torch.float64) / n
    out = torch.zeros(k.shape[:-1], dtype=torch.complex128)
    for c, s, a in zip(centres_px, sigmas_px, amps, strict=True):
        c = torch.tensor(c, dtype=torch.float64)
        env = a * (2 * math.pi * s * s) ** 1.5 * torch.exp(-2 * math.pi**2 * s * s * (k * k).sum(-1))
        out += env * torch.exp(-2j * math.pi * (k * c).sum(-1))
    return out / n


def _ctf(freqs_a: torch.Tensor, defocus_a: torch.Tensor) -> torch.Tensor:
    """A realistic CTF (300 kV, Cs 2.7 mm, 10% amplitude contrast, some astigmatism), (B, M)."""
    return compute_ctf(freqs_a, defocus_a, defocus_a * 0.97, torch.full_like(defocus_a, 0.6),
                       300.0, 2.7, 0.1)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().norm() / b.abs().norm())


# ---------------------------------------------------------------------------------------------
# 1. score_grid


def test_score_grid_equals_brute_force_error():
    """``score_grid`` (two matrix products) equals ``sum_k w |Y - C T_s P_r|^2`` for every image
    b, shift s and rotation r, summed here one (b, s, r) at a time."""
    n, radius = 16, 6.0
    gen = torch.Generator().manual_seed(0)
    formation = ImageFormation(n, 3.0).double()
    m = len(formation.coords_px)
    n_img, n_rot = 3, 5
    spectra = torch.randn(n_img, m, dtype=torch.complex128, generator=gen)
    ctf = torch.rand(n_img, m, dtype=torch.float64, generator=gen) * 2 - 1
    data = em.SearchData.in_band(formation, spectra, ctf, radius)
    p = len(data.coords_px)
    assert 0 < p < m  # the band selects a strict subset
    proj = torch.randn(n_rot, p, dtype=torch.complex128, generator=gen)
    shifts = torch.tensor([[0.0, 0.0], [1.5, -0.5], [-2.25, 0.75], [0.3, 2.0]], dtype=torch.float64)
    got = em.score_grid(data, proj, shifts)
    assert got.shape == (n_img, len(shifts), n_rot)

    keep = formation.radius_px <= radius
    k = formation.coords_px[keep] / n  # cycles per pixel
    w = torch.where((formation.coords_px[keep] == 0).all(-1), 1.0, 2.0).double()
    ref = torch.zeros(n_img, len(shifts), n_rot, dtype=torch.float64)
    for b in range(n_img):
        y, c = spectra[b, keep], ctf[b, keep]
        for s in range(len(shifts)):
            t = _phase(k, shifts[s])
            for r in range(n_rot):
                ref[b, s, r] = (w * (y - c * t * proj[r]).abs() ** 2).sum()
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10), float((got - ref).abs().max())


# ---------------------------------------------------------------------------------------------
# 2. insertion is the adjoint of slicing; backproject


def test_insert_slices_is_adjoint_of_hermitian_slicing():
    """For the real inner product <a, b> = Re sum conj(a) b, insertion (value at k, its conjugate
    at -k) is the adjoint of the Hermitian-symmetrised slicing ``S_h V(k) = S V(k) +
    conj(S V(-k))``, with S the trilinear ``sample_volume``:

        Re <V, insert(y)> = Re <S V(k) + conj(S V(-k)), y>.

    Points fill whole planes (corners beyond the box included) of random rotations, so the
    zero padding at the box edge is exercised too. The weights (denominator) obey the same
    identity with a real volume."""
    n = 16
    gen = torch.Generator().manual_seed(1)
    rot = random_rotations(4, generator=gen, dtype=torch.float64)
    pts = _rotate_plane(rot, grid_2d(n, dtype=torch.float64).reshape(-1, 2))  # (4, n*n, 3)
    pts = pts + 0.1 * torch.randn(pts.shape, generator=gen, dtype=torch.float64)
    assert float(pts.abs().max()) > n // 2  # some points outside the box
    vol = torch.randn(n, n, n, dtype=torch.complex128, generator=gen)
    y = torch.randn(pts.shape[:-1], dtype=torch.complex128, generator=gen)
    wts = torch.rand(pts.shape[:-1], dtype=torch.float64, generator=gen)
    num, den = insert_slices(y, wts, pts, n)
    assert num.dtype == torch.complex128 and den.dtype == torch.float64

    lhs = float((vol.conj() * num).real.sum())
    sliced = sample_volume(vol, pts) + sample_volume(vol, -pts).conj()
    rhs = float((sliced.conj() * y).real.sum())
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-9)
    # Not an identity that holds without the mate at -k (the test can fail):
    assert abs(lhs - float((sample_volume(vol, pts).conj() * y).real.sum())) > 1e-3 * abs(lhs)

    real_vol = vol.real
    lhs_w = float((real_vol * den).sum())
    rhs_w = float(((sample_volume(real_vol, pts) + sample_volume(real_vol, -pts)) * wts).sum())
    assert lhs_w == pytest.approx(rhs_w, rel=1e-10, abs=1e-9)


def test_insert_slices_matches_explicit_trilinear_scatter():
    """A few points (inside, on grid nodes, straddling the box edge) against an explicit
    one-point-at-a-time trilinear scatter of the value at k and its conjugate at -k."""
    n = 8
    pts = torch.tensor([[0.25, -1.5, 2.75], [1.0, 2.0, -3.0], [-4.5, 0.3, 0.0], [3.6, -3.2, 3.9],
                        [0.0, 0.0, 0.0]], dtype=torch.float64)
    vals = torch.tensor([1 + 2j, -0.5 + 0.25j, 3 - 1j, 0.7j, 2.0], dtype=torch.complex128)
    wts = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    num, den = insert_slices(vals, wts, pts, n)
    p = np.concatenate([pts.numpy(), -pts.numpy()])
    ref_num = _trilinear_scatter(p, np.concatenate([vals.numpy(), vals.numpy().conj()]), n)
    ref_den = _trilinear_scatter(p, np.concatenate([wts.numpy(), wts.numpy()]), n)
    np.testing.assert_allclose(num.numpy(), ref_num, atol=1e-12)
    np.testing.assert_allclose(den.numpy(), ref_den, atol=1e-12)


def test_backproject_inserts_ctf_unshifted_values_and_ctf_squared():
    """``backproject`` = insert_slices of ``C conj(T) Y`` and ``C^2`` at ``R (kx, ky, 0)``."""
    n = 16
    gen = torch.Generator().manual_seed(2)
    formation = ImageFormation(n, 4.0).double()
    coords = formation.coords_px
    b = 3
    rot = random_rotations(b, generator=gen, dtype=torch.float64)
    y = torch.randn(b, len(coords), dtype=torch.complex128, generator=gen)
    c = _ctf(formation.freqs_a, torch.tensor([9000.0, 15000.0, 21000.0], dtype=torch.float64))
    shifts = torch.tensor([[1.25, -0.5], [0.0, 2.0], [-1.75, -0.25]], dtype=torch.float64)
    t = torch.stack([_phase(coords / n, s) for s in shifts])
    num, den = backproject(y, c, rot, coords, n, t)
    pts = _rotate_plane(rot, coords)
    ref_num, ref_den = insert_slices(c * t.conj() * y, c * c, pts, n)
    assert torch.allclose(num, ref_num, atol=1e-12) and torch.allclose(den, ref_den, atol=1e-12)
    num0, den0 = backproject(y, c, rot, coords, n)
    ref0, _ = insert_slices(c * y, c * c, pts, n)
    assert torch.allclose(num0, ref0, atol=1e-12) and torch.allclose(den0, ref_den, atol=1e-12)
    assert (num0 - num).abs().max() > 0.1  # the shifts matter


# ---------------------------------------------------------------------------------------------
# 3. noise-free regularised reconstruction

# An asymmetric cluster of Gaussians near the centre (so that phases matter and the Fourier
# transform is smooth enough for trilinear gridding): (x, y, z) pixels, sigma, amplitude.
_CENTRES = [(0.0, 0.0, 0.0), (2.0, -1.0, 1.0), (-1.0, 2.0, -1.5), (1.0, 1.0, -2.0)]
_SIGMAS = [1.6, 1.3, 1.2, 1.4]
_AMPS = [1.0, 0.8, -0.5, 0.6]


@pytest.mark.parametrize("with_ctf_and_shifts", [False, True])
def test_noise_free_reconstruction_recovers_volume(with_ctf_and_shifts):
    """Exact central slices (the analytic Fourier transform of Gaussian blobs at R (kx, ky, 0))
    of 3000 random poses, back-projected and solved with a vanishing regulariser, give back
    ``fft3_c(volume) / N`` inside radius N//2 - 2. Optionally with a realistic CTF (zeros
    included) and random shifts, which ``backproject`` must undo.

    The error left is the trilinear gridding's (a CTF^2-weighted local average of the slices'
    values at integer in-plane frequencies), systematic, not sampling: measured 0.034 without
    and 0.074 with CTF and shifts (the same with 10,000 poses). A conjugate instead of the value
    (or the value instead of the conjugate at -k), a wrong phase sign or transposed rotations
    give errors of order 1."""
    n = 24
    gen = torch.Generator().manual_seed(3)
    vol = _blobs(n, _CENTRES, _SIGMAS, _AMPS)
    target = fft3_c(vol) / n
    # The analytic transform is the DFT of the sampled blobs (no aliasing at these widths):
    # this also checks the centred-FFT phase convention the comparison relies on.
    k3 = grid_3d(n, dtype=torch.float64)
    assert _relative_error(_blobs_ft(k3, n, _CENTRES, _SIGMAS, _AMPS), target) < 1e-3

    formation = ImageFormation(n, 4.0).double()
    coords = formation.coords_px
    rot = random_rotations(3000, generator=gen, dtype=torch.float64)
    y = _blobs_ft(_rotate_plane(rot, coords), n, _CENTRES, _SIGMAS, _AMPS)  # (B, M)
    phases = None
    if with_ctf_and_shifts:
        defocus = 8000 + 16000 * torch.rand(len(rot), dtype=torch.float64, generator=gen)
        ctf = _ctf(formation.freqs_a, defocus)
        shifts = 3 * torch.randn(len(rot), 2, dtype=torch.float64, generator=gen)
        phases = torch.exp(-2j * math.pi * (shifts @ (coords / n).T))
        y = ctf * phases * y
    else:
        ctf = torch.ones(y.shape, dtype=torch.float64)
    num, den = backproject(y, ctf, rot, coords, n, phases)
    r_max = n // 2 - 1
    rec = regularised_solve(num, den, 1e-6 * float(den.mean()), radius_px=r_max,
                            mask=torch.ones(n, n, n, dtype=torch.float64))
    inside = radius_grid_3d(n, dtype=torch.float64) <= n // 2 - 2
    err = _relative_error(rec[inside], target[inside])
    print(f"reconstruction relative error (ctf and shifts: {with_ctf_and_shifts}): {err:.4f}")
    assert err < (0.10 if with_ctf_and_shifts else 0.05)
    # Real-space check: the map (1/N scale undone) is the volume, band-limited.
    band = torch.where(radius_grid_3d(n, dtype=torch.float64) <= r_max, target, 0)
    ref_map = ifft3_c(band).real * n
    rec_map = ifft3_c(rec).real * n
    corr = float(np.corrcoef(rec_map.reshape(-1), ref_map.reshape(-1))[0, 1])
    print(f"real-space correlation {corr:.5f}")
    assert corr > 0.995


@pytest.mark.parametrize("x_px", [
    0.0,
    pytest.param(8.0, marks=pytest.mark.xfail(
        strict=True, reason="no gridding correction: un-padded trilinear insertion attenuates "
                            "the map by ~sinc^2(x/N) per axis (0.70 at x = N/3)")),
])
def test_noise_free_reconstruction_keeps_amplitude_off_centre(x_px):
    """The amplitude of one Gaussian blob at ``(x, 0, 0)`` after noise-free back-projection and a
    vanishing regulariser, over its band-limited truth (least-squares ratio in real space): 1 at
    the centre (measured 1.006). Off centre, ``num / den`` is a local trilinear average of the
    slices' values, which multiplies the map by the kernel's transform, about
    ``sinc^2(x/N) sinc^2(y/N) sinc^2(z/N)``: measured 0.919, 0.820, 0.697, 0.583 at x = 4, 6, 8,
    10 px (N = 24; sinc^2 gives 0.912, 0.811, 0.684, 0.545). Expected to pass once the insertion
    is oversampled or gridding-corrected."""
    n = 24
    centres, sigmas, amps = [(x_px, 0.0, 0.0)], [1.5], [1.0]
    formation = ImageFormation(n, 4.0).double()
    coords = formation.coords_px
    rot = random_rotations(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = _blobs_ft(_rotate_plane(rot, coords), n, centres, sigmas, amps)
    num, den = backproject(y, torch.ones(y.shape, dtype=torch.float64), rot, coords, n)
    r_max = n // 2 - 1
    rec = regularised_solve(num, den, 1e-9 * float(den.mean()), radius_px=r_max,
                            mask=torch.ones(n, n, n, dtype=torch.float64))
    target = fft3_c(_blobs(n, centres, sigmas, amps)) / n
    truth = ifft3_c(torch.where(radius_grid_3d(n, dtype=torch.float64) <= r_max, target, 0)).real
    got = ifft3_c(rec).real
    ratio = float((got * truth).sum() / (truth * truth).sum())
    print(f"amplitude ratio of a blob at x = {x_px} px: {ratio:.3f}")
    assert ratio == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------------------------------------
# 4. local rotations and local refinement


def test_local_rotations_are_proper_rotations_within_range():
    max_angle = 0.3
    gen = torch.Generator().manual_seed(4)
    r = em.local_rotations(500, max_angle, generator=gen, dtype=torch.float64)
    assert r.shape == (500, 3, 3) and r.dtype == torch.float64
    assert torch.equal(r[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(500, dtype=torch.float64), atol=1e-12)
    # The angle of a rotation from its trace, written out here.
    trace = r.diagonal(dim1=1, dim2=2).sum(-1)
    angle = torch.acos(((trace - 1) / 2).clamp(-1, 1))
    assert torch.allclose(angle, geodesic_distance(eye, r), atol=1e-6)
    assert float(angle.max()) <= max_angle + 1e-9
    assert float((angle > max_angle / 2).float().mean()) > 0.5  # not all tiny (expected 7/8)
    # Rotation axes point everywhere (not one fixed axis): a spread of axis directions.
    axes = torch.stack([r[1:, 2, 1] - r[1:, 1, 2], r[1:, 0, 2] - r[1:, 2, 0], r[1:, 1, 0] - r[1:, 0, 1]], -1)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    assert float(axes.mean(0).norm()) < 0.2


def _smooth_fourier_volume(n: int, seed: int) -> torch.Tensor:
    """``fft3_c(volume) / N`` (complex64) of a smooth random real volume inside a sphere."""
    gen = torch.Generator().manual_seed(seed)
    vol = torch.randn(n, n, n, generator=gen, dtype=torch.float64)
    vol = torch.nn.functional.avg_pool3d(vol[None, None], 3, 1, 1)[0, 0]
    vol = vol * (radius_grid_3d(n, dtype=torch.float64) < 0.35 * n)
    return (fft3_c(vol) / n).to(torch.complex64)


def _brute_force_error(formation, fvol, y, ctf, rot, shifts_px, radius):
    """``sum_k w |Y - C T P_R|^2`` of each image at one pose, with explicit slices and phases."""
    keep = formation.radius_px <= radius
    coords = formation.coords_px[keep].double()
    w = formation.hermitian_weight[keep].double()
    out = []
    for b in range(len(y)):
        p = sample_volume(fvol.to(torch.complex128), _rotate_plane(rot[b:b + 1].double(), coords))[0]
        pred = ctf[b, keep].double() * _phase(coords / formation.box_px, shifts_px[b].double()) * p
        out.append(float((w * (y[b, keep].to(torch.complex128) - pred).abs() ** 2).sum()))
    return torch.tensor(out, dtype=torch.float64)


def _render(formation, fvol, rot, shifts_px, ctf):
    """Noise-free spectra (B, M): C * exp(-2 pi i k . s) * V(R (kx, ky, 0))."""
    coords = formation.coords_px
    p = sample_volume(fvol, _rotate_plane(rot, coords))
    t = torch.stack([_phase(coords / formation.box_px, s) for s in shifts_px]).to(p.dtype)
    return ctf * t * p


def test_refine_local_keeps_true_pose_and_never_worsens():
    n, radius = 20, 7.0
    gen = torch.Generator().manual_seed(5)
    formation = ImageFormation(n, 4.0)
    fvol = _smooth_fourier_volume(n, 5)
    b = 6
    rot = random_rotations(b, generator=gen)
    shifts = torch.randn(b, 2, generator=gen) * 2
    ctf = _ctf(formation.freqs_a, 10000 + 10000 * torch.rand(b, generator=gen))
    y = _render(formation, fvol, rot, shifts, ctf)

    # The current pose is the true one: it is kept (the identity candidate, the centre shift).
    r_out, s_out = em.refine_local(formation, fvol, y, ctf, rot, shifts, radius, max_angle_rad=0.2,
                                   n_candidates=16, shift_step_px=0.5,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r_out, rot, atol=1e-6) and torch.allclose(s_out, shifts, atol=1e-6)

    # Off the true pose: the result never scores worse than the start (brute-force error), and
    # here it improves on it.
    axis = torch.nn.functional.normalize(torch.randn(b, 3, generator=gen), dim=-1)
    kx = torch.zeros(b, 3, 3)  # cross-product matrices of the axes
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    kx = kx - kx.transpose(1, 2)
    ang = 0.08  # rad, Rodrigues' formula
    perturb = torch.eye(3) + math.sin(ang) * kx + (1 - math.cos(ang)) * kx @ kx
    r0 = rot @ perturb
    s0 = shifts + torch.tensor([0.4, -0.3])
    err0 = _brute_force_error(formation, fvol, y, ctf, r0, s0, radius)
    worst_improvement = 0.0
    r1, s1 = r0, s0
    for seed in range(3):
        r1, s1 = em.refine_local(formation, fvol, y, ctf, r1, s1, radius, max_angle_rad=0.15,
                                 n_candidates=32, shift_step_px=0.25,
                                 generator=torch.Generator().manual_seed(seed))
        err1 = _brute_force_error(formation, fvol, y, ctf, r1, s1, radius)
        assert (err1 <= err0 * (1 + 1e-5)).all(), (err0, err1)
        worst_improvement = float((err1 / err0).max())
        err0 = err1
    assert worst_improvement < 1.0
    assert float(geodesic_distance(r1, rot).max()) < float(geodesic_distance(r0, rot).min())


def test_argmin_rows_is_the_flat_argmin_with_ties():
    gen = torch.Generator().manual_seed(3)
    errors = torch.randn(40, 7, 300, generator=gen)
    errors[:5] = errors[:5].round()  # many ties: the first in (shift, rotation) order wins
    errors[5] = 1.0
    errors[6, 3, 10] = errors[6, 2, 20] = -10.0
    expected = errors.view(40, -1).argmin(dim=-1)
    torch.testing.assert_close(em.argmin_rows(errors), expected)
    assert int(em.argmin_rows(errors)[6]) == 2 * 300 + 20


def test_refine_newton_keeps_true_pose_and_converges_from_a_few_degrees():
    """Newton rounds on the quadratic model: the true pose stays (it scores best of the stencil
    and the model's minimum is on it), the error never increases (brute-force error), and from
    poses 4 deg and 0.6 px off, three rounds with halving steps come back to under 0.5 deg and
    0.1 px on noise-free images, closer than as many rounds of 32 random candidates."""
    n, radius = 24, 9.0
    gen = torch.Generator().manual_seed(7)
    formation = ImageFormation(n, 4.0)
    fvol = _smooth_fourier_volume(n, 3)
    b = 8
    rot = random_rotations(b, generator=gen)
    shifts = torch.randn(b, 2, generator=gen) * 2
    ctf = _ctf(formation.freqs_a, 10000 + 10000 * torch.rand(b, generator=gen))
    y = _render(formation, fvol, rot, shifts, ctf)

    r_out, s_out = em.refine_newton(formation, fvol, y, ctf, rot, shifts, radius,
                                    step_rad=math.radians(2.0), shift_step_px=0.5)
    assert float(geodesic_distance(r_out, rot).max()) < math.radians(0.05)
    assert float((s_out - shifts).norm(dim=-1).max()) < 0.01

    axis = torch.nn.functional.normalize(torch.randn(b, 3, generator=gen), dim=-1)
    from cryoai.physics.rotations import axis_angle_to_matrix
    r0 = rot @ axis_angle_to_matrix(axis * math.radians(4.0))
    direction = torch.nn.functional.normalize(torch.randn(b, 2, generator=gen), dim=-1)
    s0 = shifts + 0.6 * direction
    err = _brute_force_error(formation, fvol, y, ctf, r0, s0, radius)
    r1, s1 = r0, s0
    rr, sr = r0, s0
    step, shift_step = math.radians(3.5), 0.5
    for k in range(3):
        r1, s1 = em.refine_newton(formation, fvol, y, ctf, r1, s1, radius, step_rad=step,
                                  shift_step_px=shift_step)
        err1 = _brute_force_error(formation, fvol, y, ctf, r1, s1, radius)
        assert (err1 <= err * (1 + 1e-5)).all(), (err, err1)
        err = err1
        rr, sr = em.refine_local(formation, fvol, y, ctf, rr, sr, radius, max_angle_rad=2 * step,
                                 n_candidates=32, shift_step_px=shift_step,
                                 generator=torch.Generator().manual_seed(k))
        step, shift_step = step / 2, shift_step / 2
    newton_deg = torch.rad2deg(geodesic_distance(r1, rot))
    random_deg = torch.rad2deg(geodesic_distance(rr, rot))
    assert float(newton_deg.max()) < 0.5, newton_deg
    assert float((s1 - shifts).norm(dim=-1).max()) < 0.1
    assert float(newton_deg.median()) < float(random_deg.median()), (newton_deg, random_deg)


# ---------------------------------------------------------------------------------------------
# 5. shift grid and global assignment


@pytest.mark.parametrize("max_shift,step", [(6.0, 1.5), (2.0, 1.0), (3.0, 0.7), (1.0, 2.0)])
def test_shift_grid_is_the_lattice_inside_the_disk(max_shift, step):
    pts = em.shift_grid(max_shift, step, dtype=torch.float64)
    assert pts.shape[-1] == 2
    assert float(pts.norm(dim=-1).max()) <= max_shift + 1e-6
    # Every point is a lattice point of spacing `step` ...
    q = pts / step
    assert torch.allclose(q, q.round(), atol=1e-9)
    # ... and every lattice point inside the disk is there, once.
    k = int(max_shift / step) + 2
    ref = {(i, j) for i in range(-k, k + 1) for j in range(-k, k + 1)
           if math.hypot(i * step, j * step) <= max_shift + 1e-9}
    got = [tuple(int(v) for v in row) for row in q.round().long()]
    assert len(got) == len(set(got)) and set(got) == ref
    if len(pts) > 1:
        d = torch.cdist(pts, pts) + torch.eye(len(pts), dtype=torch.float64) * 1e9
        assert float(d.min()) == pytest.approx(step)
    assert [0.0, 0.0] in pts.tolist()


def test_assign_global_recovers_grid_rotation_and_shift():
    """Images projected in real space (line integrals, ``project_real_space``) at grid rotations,
    shifted by whole pixels with ``torch.roll`` and multiplied by a realistic CTF: the global
    assignment against ``fft3_c(volume) / N`` finds their exact grid rotation and shift."""
    n = 20
    gen = torch.Generator().manual_seed(6)
    vol = torch.randn(n, n, n, generator=gen, dtype=torch.float64)
    vol = torch.nn.functional.avg_pool3d(vol[None, None], 3, 1, 1)[0, 0]
    vol = vol * (radius_grid_3d(n, dtype=torch.float64) < 0.3 * n)
    fvol = fft3_c(vol) / n
    formation = ImageFormation(n, 4.0).double()
    grid = so3_grid(300, dtype=torch.float64)
    shifts = em.shift_grid(2.0, 1.0, dtype=torch.float64)
    b = 12
    ri = torch.randint(len(grid), (b,), generator=gen)
    si = torch.randint(len(shifts), (b,), generator=gen)
    assert (shifts[si].abs().sum(-1) > 0).sum() >= b // 2  # most images are shifted
    proj = project_real_space(vol, grid[ri])
    images = torch.stack([torch.roll(p, (int(shifts[j, 1]), int(shifts[j, 0])), dims=(-2, -1))
                          for p, j in zip(proj, si.tolist(), strict=True)])
    ctf = _ctf(formation.freqs_a, 12000 + 8000 * torch.rand(b, dtype=torch.float64, generator=gen))
    y = ctf * formation.spectra(images)
    rot, sh = em.assign_global(formation, fvol, y, ctf, 7.0, grid, shifts, chunk=5)
    assert torch.equal(rot, grid[ri])
    assert torch.equal(sh, shifts[si])


# ---------------------------------------------------------------------------------------------
# 6. centre of mass


def test_centre_of_mass_of_shifted_blob():
    n = 24
    shift = (2.5, -3.0, 1.25)  # (x, y, z) pixels
    vol = _blobs(n, [shift, (-6.0, 6.0, -6.0)], [1.5, 1.0], [1.0, -3.0])  # a negative blob too
    com = centre_of_mass(vol)
    assert torch.allclose(com, torch.tensor(shift, dtype=torch.float64), atol=1e-6), com
    # Index convention: a single positive voxel at [z, y, x] = N//2 + (1, 2, 3).
    one = torch.zeros(n, n, n, dtype=torch.float64)
    one[n // 2 + 1, n // 2 + 2, n // 2 + 3] = 1.0
    assert centre_of_mass(one).tolist() == [3.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# 7. the half-map FSC-regularised reconstruction on simulated noise-free particles


def test_reconstruct_noise_free_simulation(tmp_path):
    from cryoai.cli.main import main as cli
    from cryoai.data.dataset import ParticleDataset
    from cryoai.io import load_particles, read_volume
    from cryoai.physics.masks import spherical_mask
    from cryoai.physics.poses import Poses
    from cryoai.reconstruction import ParticleSpectra, reconstruct

    n = 24
    assert cli(["simulate", "--box", str(n), "--n", "300", "--no-noise", "--outdir", str(tmp_path),
                "--quiet", "--seed", "1", "--device", "cpu", "--shift-sigma-a", "20"]) == 0
    table = load_particles(tmp_path / "particles.star")
    truth, _ = read_volume(tmp_path / "ground_truth.mrc")
    formation = ImageFormation(n, float(np.asarray(table.pixel_size_a).reshape(-1)[0]))
    particles = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
    poses = Poses.from_arrays(table.rotations, table.shifts_a)
    rec = reconstruct(particles, poses, mask_radius_px=0.45 * n)
    fsc = rec.fsc_halves
    print("fsc of the halves:", np.round(fsc.numpy(), 3))
    assert float(fsc[1:11].min()) > 0.95  # measured >= 0.99
    vol = (ifft3_c(rec.fourier_volume).real * n).double()
    mask = spherical_mask(n, 0.45 * n, dtype=torch.float64) > 0.5
    t = torch.as_tensor(truth, dtype=torch.float64)
    corr = float(np.corrcoef(vol[mask].numpy(), t[mask].numpy())[0, 1])
    # Scale (least squares, map over truth): measured 0.71, the same with a vanishing regulariser
    # and uniform over shells 2-10 (0.70-0.78): the gridding attenuation of
    # test_noise_free_reconstruction_keeps_amplitude_off_centre over a ribosome filling the
    # mask. The loose bar catches a lost or doubled 1/N scale or a flipped sign.
    scale = float((vol[mask] * t[mask]).sum() / (t[mask] ** 2).sum())
    print(f"correlation with the truth {corr:.4f}, scale {scale:.3f}")
    assert corr > 0.9  # measured 0.969
    assert 0.5 < scale < 1.2


# ---------------------------------------------------------------------------------------------
# 8. fitting FourierNet to a Fourier volume


def test_fit_decoder_lowers_relative_error():
    from cryoai.models.decoders import FourierNet
    from cryoai.physics.grids import in_half_space, n_shells, shell_index
    from cryoai.training.decoder_fit import fit_decoder_to_fourier_volume

    n = 16
    torch.manual_seed(0)
    vol = _blobs(n, _CENTRES, _SIGMAS, _AMPS)
    fvol = (fft3_c(vol) / n).to(torch.complex64)
    decoder = FourierNet(n, width=32)

    g = grid_3d(n).reshape(-1, 3)
    sel = in_half_space(g) & (g.norm(dim=-1) <= n // 2 - 1)
    pts, vals = g[sel], fvol.reshape(-1)[sel]
    shell = shell_index(pts.norm(dim=-1))
    power = torch.zeros(n_shells(n)).index_add_(0, shell, vals.abs() ** 2)
    power = power / torch.bincount(shell, minlength=n_shells(n)).clamp_min(1)

    def error() -> float:
        """Shell-normalised relative squared error over every kept point (here, not sampled)."""
        with torch.no_grad():
            pred = decoder.half_space_values(pts)
        return float(((pred - vals).abs() ** 2 / power[shell]).mean())

    before = error()
    loss = fit_decoder_to_fourier_volume(decoder, fvol, steps=200, batch_points=1024, lr=1e-3, seed=0)
    after = error()
    print(f"fit: error before {before:.4f}, after {after:.4f}, reported {loss:.4f}")
    assert after < 0.5 * before
    assert loss == pytest.approx(after, rel=0.5)
