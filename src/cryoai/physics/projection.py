"""Projection: central slices of a Fourier volume and a real-space reference projector.

Both follow CONVENTIONS.md: ``image(x, y) = sum_z V(R @ (x, y, z))`` and
``F_image(kx, ky) = F_volume(R @ (kx, ky, 0))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fft import crop_center_2d, fft3_c, ifft2_c, pad_volume
from .grids import centered_coords_1d, grid_2d, grid_3d


def sample_volume(volume: torch.Tensor, coords_px: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a (real or complex) volume at arbitrary points.

    Parameters
    ----------
    volume : (N, N, N) real or complex tensor, indexed [z, y, x], centre ``N//2``.
    coords_px : (..., 3) points ``(x, y, z)`` in centred voxel units. Points outside the box
        read zero.

    Returns
    -------
    (...) tensor with the volume's dtype.
    """
    if volume.is_complex():
        out = sample_channels(torch.stack([volume.real, volume.imag], dim=0), coords_px)
        return torch.complex(out[0], out[1])
    return sample_channels(volume[None], coords_px)[0]


def sample_channels(volumes: torch.Tensor, coords_px: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of C real volumes at the same points (see :func:`sample_volume`).

    Parameters
    ----------
    volumes : (C, N, N, N) real tensor, each indexed [z, y, x], centre ``N//2`` (e.g. the real
        and imaginary parts of a Fourier volume, stored apart).
    coords_px : (..., 3) points ``(x, y, z)`` in centred voxel units; outside the box reads 0.

    Returns
    -------
    (C, ...) tensor.
    """
    n = volumes.shape[-1]
    lead = coords_px.shape[:-1]
    flat = coords_px.reshape(-1, 3)
    n_points = flat.shape[0]
    # ATen's CPU kernel for 3-D grid_sample runs its batch items in parallel but each item on
    # one thread: on CPU the points are split into one batch item per thread, over the same
    # volume (expanded, not copied); the last item is padded with points at the centre, dropped.
    parts = _cpu_parts(volumes, n_points)
    per_part = -(-n_points // parts)
    scale = 2.0 / (n - 1)  # centred pixels -> grid_sample's [-1, 1] (align_corners=True)
    offset = n // 2 * scale - 1.0
    if flat.requires_grad and torch.is_grad_enabled():  # (e.g. poses learned through the slices)
        grid = flat.to(volumes.dtype) * scale + offset
        grid = torch.cat([grid, grid.new_zeros(parts * per_part - n_points, 3)])
    else:  # one pass, into the padded buffer
        grid = torch.empty(parts * per_part, 3, dtype=volumes.dtype, device=volumes.device)
        torch.add(torch.tensor(offset, dtype=volumes.dtype, device=volumes.device), flat, alpha=scale,
                  out=grid[:n_points])
        grid[n_points:] = 0.0
    out = F.grid_sample(volumes[None].expand(parts, *volumes.shape), grid.view(parts, per_part, 1, 1, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    c = volumes.shape[0]
    if parts > 1:
        out = out.reshape(parts, c, per_part).transpose(0, 1).reshape(c, -1)[:, :n_points]
    return out.reshape(c, *lead)


# Below this many points per thread, one call on one thread is as fast as splitting.
_MIN_POINTS_PER_THREAD = 8192


def _cpu_parts(volumes: torch.Tensor, n_points: int) -> int:
    """How many batch items to split ``n_points`` into for grid_sample: the threads on CPU, 1 elsewhere."""
    if volumes.device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n_points // _MIN_POINTS_PER_THREAD))


def slice_coords(rotations: torch.Tensor, coords_2d: torch.Tensor) -> torch.Tensor:
    """Rotate in-plane frequency points into the volume: ``R @ (kx, ky, 0)``.

    Parameters
    ----------
    rotations : (B, 3, 3).
    coords_2d : (M, 2) or (N, N, 2) points ``(kx, ky)``.

    Returns
    -------
    (B, *coords_2d.shape[:-1], 3) points ``(x, y, z)``.
    """
    flat = coords_2d.reshape(-1, 2).to(rotations.dtype)
    # R @ (kx, ky, 0) = kx * R[:, :, 0] + ky * R[:, :, 1]
    pts = torch.addcmul(flat[None, :, 0:1] * rotations[:, None, :, 0], flat[None, :, 1:2],
                        rotations[:, None, :, 1])
    return pts.reshape(rotations.shape[0], *coords_2d.shape[:-1], 3)


def extract_central_slices(fourier_volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Central slices of a centred Fourier volume, trilinear.

    Parameters
    ----------
    fourier_volume : (N, N, N) complex, ``fft3_c`` of a volume.
    rotations : (B, 3, 3) poses.

    Returns
    -------
    (B, N, N) complex centred 2D spectra.
    """
    n = fourier_volume.shape[-1]
    g = grid_2d(n, device=fourier_volume.device, dtype=fourier_volume.real.dtype)
    return sample_volume(fourier_volume, slice_coords(rotations, g))


def project_fourier(volume: torch.Tensor, rotations: torch.Tensor, *, oversample: int = 2,
                    chunk: int = 64) -> torch.Tensor:
    """Projections of a real volume through the Fourier slice theorem.

    The volume is zero-padded ``oversample`` times before its FFT, which makes trilinear
    interpolation in Fourier space accurate; the slices are inverted and cropped back.

    Parameters
    ----------
    volume : (N, N, N) real, [z, y, x].
    rotations : (B, 3, 3).
    oversample : padding factor (1 = no padding).

    Returns
    -------
    (B, N, N) real projections.
    """
    n = volume.shape[-1]
    big = n * oversample
    fvol = fft3_c(pad_volume(volume, big))
    out = []
    for start in range(0, rotations.shape[0], chunk):
        spec = extract_central_slices(fvol, rotations[start:start + chunk])
        out.append(crop_center_2d(ifft2_c(spec).real, n))
    return torch.cat(out, dim=0) if out else volume.new_zeros(0, n, n)


def project_real_space(volume: torch.Tensor, rotations: torch.Tensor, *, chunk: int = 4) -> torch.Tensor:
    """Reference projector: line integrals ``sum_z V(R @ (x, y, z))`` by trilinear sampling.

    Parameters
    ----------
    volume : (N, N, N) real, [z, y, x].
    rotations : (B, 3, 3).

    Returns
    -------
    (B, N, N) real projections, indexed [y, x].
    """
    n = volume.shape[-1]
    pts = grid_3d(n, device=volume.device, dtype=volume.dtype).reshape(-1, 3)  # [z, y, x] order
    out = []
    for start in range(0, rotations.shape[0], chunk):
        r = rotations[start:start + chunk].to(volume.dtype)
        rotated = torch.einsum("bij,mj->bmi", r, pts)
        vals = sample_volume(volume, rotated).reshape(-1, n, n, n)
        out.append(vals.sum(dim=1))
    return torch.cat(out, dim=0) if out else volume.new_zeros(0, n, n)


def sample_planes(planes: torch.Tensor, coords_px: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of K (real or complex) 2D grids at the same points.

    The 2D counterpart of :func:`sample_volume`: e.g. class averages' centred spectra read at
    in-plane rotated frequencies (:func:`inplane_rotations`).

    Parameters
    ----------
    planes : (K, N, N) tensor, each indexed [y, x], centre ``N//2``.
    coords_px : (..., 2) points ``(x, y)`` in centred pixel units; outside the box reads 0.

    Returns
    -------
    (K, ...) tensor with the planes' dtype.
    """
    if planes.is_complex():
        parts = torch.cat([planes.real, planes.imag])
        out = sample_planes(parts, coords_px)
        k = planes.shape[0]
        return torch.complex(out[:k], out[k:])
    n = planes.shape[-1]
    lead = coords_px.shape[:-1]
    scale = 2.0 / (n - 1)  # centred pixels -> grid_sample's [-1, 1] (align_corners=True)
    grid = coords_px.reshape(1, -1, 1, 2).to(planes.dtype) * scale + (n // 2 * scale - 1.0)
    out = F.grid_sample(planes[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(planes.shape[0], *lead)


def inplane_rotations(angles_rad: torch.Tensor, coords_2d: torch.Tensor) -> torch.Tensor:
    """In-plane rotated points: ``(J, M, 2)`` = ``R(angle_j) @ (x, y)`` for (J,) angles and
    (M, 2) points (counter-clockwise for positive angles).
    """
    c, s = torch.cos(angles_rad).to(coords_2d.dtype), torch.sin(angles_rad).to(coords_2d.dtype)
    x, y = coords_2d[:, 0], coords_2d[:, 1]
    return torch.stack([c[:, None] * x - s[:, None] * y, s[:, None] * x + c[:, None] * y], dim=-1)


def trilinear_weight(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """How trilinear interpolation in Fourier space weighs an (N, N, N) map in real space:
    ``sinc^2(x/N) sinc^2(y/N) sinc^2(z/N)``, ``x, y, z`` in px from the box centre (the
    transform of the interpolation's triangle kernel, the box's period; 1 at the centre, 0.41
    per axis at the box's faces).

    The central slices of :func:`sample_volume` are the projections of the map times this
    weight, and a map made by trilinear insertion (:func:`cryoai.physics.backprojection.insert_slices`,
    with its weights' sum as denominator) is the true map times it. So a map fitted through
    the slices (the decoder's) is the true map divided by it, and the written maps are corrected
    as RELION corrects its gridding: the decoder's map multiplied by it, the reconstructions
    divided by it (:func:`gridding_corrected`).

    Returns
    -------
    (N, N, N) real, indexed [z, y, x].
    """
    s = torch.sinc(centered_coords_1d(n, device=device, dtype=torch.float64) / n) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(dtype)


def gridding_corrected(volume: torch.Tensor, *, fitted: bool = False) -> torch.Tensor:
    """A real (N, N, N) map in true amplitudes: a reconstruction by trilinear insertion divided by
    :func:`trilinear_weight`; with ``fitted``, a map fitted through trilinear slices (the
    decoder's) multiplied by it. Maps are masked inside the box, where the weight is at least
    0.41^3 at the corners and about 0.5 at the mask's edge: the division stays bounded.
    """
    w = trilinear_weight(volume.shape[-1], device=volume.device, dtype=volume.dtype)
    return volume * w if fitted else volume / w
