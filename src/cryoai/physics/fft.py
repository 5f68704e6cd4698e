"""Centred FFTs and Fourier cropping/padding.

Centred means the zero frequency sits at index ``N//2`` of every transformed axis:
``fft2_c(x) = fftshift(fft2(ifftshift(x)))`` with backward normalisation.
"""

from __future__ import annotations

import torch


def _checkerboard(h: int, w: int, device, dtype) -> torch.Tensor:
    """(-1)^(i + j) on an (h, w) grid."""
    i = torch.arange(h, device=device)
    j = torch.arange(w, device=device)
    return (1 - 2 * ((i[:, None] + j[None, :]) % 2)).to(dtype)


def _centred_2d(x: torch.Tensor, transform) -> torch.Tensor:
    """``fftshift(transform(ifftshift(x)))`` over the last two axes.

    For even sizes the two shifts are a modulation: shifting by N/2 multiplies the other domain
    by (-1)^k, so the result is ``C * transform(C * x)`` with the checkerboard C = (-1)^(i+j),
    times (-1)^(H/2 + W/2). The same numbers without the four copies of ``roll``.
    """
    dims = (-2, -1)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        return torch.fft.fftshift(transform(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)
    real_dtype = x.real.dtype if x.is_complex() else x.dtype
    c = _checkerboard(h, w, x.device, real_dtype)
    c_out = -c if (h // 2 + w // 2) % 2 else c
    return transform(x * c, dim=dims).mul_(c_out)


def fft2_c(images: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT over the last two axes.

    Parameters
    ----------
    images : (..., N, N) real or complex tensor, indexed [y, x].

    Returns
    -------
    (..., N, N) complex tensor, DC at [N//2, N//2].
    """
    return _centred_2d(images, torch.fft.fft2)


def ifft2_c(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_c` (complex output; take ``.real`` for real images)."""
    return _centred_2d(spectra, torch.fft.ifft2)


def half_spectrum_index(coords_px: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the centred coefficients at integer frequencies sit in a real FFT's output.

    Parameters
    ----------
    coords_px : (M, 2) integer frequencies (kx, ky) in cycles per box, with ``ky >= 0`` (one
        Hermitian half) and ``-N/2 <= kx <= N/2`` (N/2 and -N/2 are the same coefficient).
    n : the (even) box N.

    Returns
    -------
    flat_index : (M,) int64 index into ``torch.fft.rfftn(images, dim=(-1, -2))`` flattened over
        its last two axes (shape (..., N/2 + 1, N): ky from 0 to N/2, then kx in FFT order).
    sign : (M,) float32, (-1)^(kx + ky): the phase of the centred convention (origin at N/2).

    See :func:`half_spectrum`.
    """
    k = torch.round(coords_px).long()
    kx, ky = k[:, 0], k[:, 1]
    if n % 2 or bool((ky < 0).any()) or bool((ky > n // 2).any()) or bool((kx.abs() > n // 2).any()):
        raise ValueError("half_spectrum_index needs an even box and frequencies with 0 <= ky <= N/2")
    flat_index = ky * n + torch.remainder(kx, n)
    sign = (1 - 2 * torch.remainder(kx + ky, 2)).to(torch.float32)
    return flat_index, sign


def half_spectrum(images: torch.Tensor, flat_index: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Centred spectrum coefficients of real images at the frequencies of
    :func:`half_spectrum_index`, from a real FFT: ``fft2_c(images)[..., ky + N/2, kx + N/2]`` for
    each (kx, ky), at about a third of the cost of the full complex transform.

    Parameters
    ----------
    images : (..., N, N) real tensor.
    flat_index, sign : from :func:`half_spectrum_index` for this N.

    Returns
    -------
    (..., M) complex tensor.
    """
    spec = torch.fft.rfftn(images, dim=(-1, -2))  # (..., N/2 + 1, N): the ky >= 0 half
    return spec.flatten(-2)[..., flat_index] * sign.to(spec.real.dtype)


def fft3_c(volume: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT over the last three axes, (..., N, N, N) indexed [z, y, x]."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume, dim=dims), dim=dims), dim=dims)


def ifft3_c(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_c` (complex output)."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims), dim=dims)


def _crop_slices(n_in: int, n_out: int) -> slice:
    start = n_in // 2 - n_out // 2
    return slice(start, start + n_out)


def fourier_crop_2d(images: torch.Tensor, n_out: int) -> torch.Tensor:
    """Downsample images by cropping their centred spectrum (band-limited resampling).

    Parameters
    ----------
    images : (..., N, N) real tensor, N even.
    n_out : output box, even, ``n_out <= N``.

    Returns
    -------
    (..., n_out, n_out) real tensor. Pixel values are scaled by ``(n_out / N)**2`` so that the
    mean value (DC per pixel) is preserved. The new pixel size is ``pixel_size * N / n_out``.

    The frequencies kept are ``-n_out/2 < k < n_out/2`` on each axis: the new Nyquist row and
    column have no partner and are dropped, so the output is real. Computed with real FFTs
    (the centring phases of input and output cancel for even sizes, so the origin N/2 maps to
    n_out/2).
    """
    n_in = images.shape[-1]
    if n_out > n_in or n_out % 2 or n_in % 2:
        raise ValueError(f"fourier_crop_2d needs even sizes with n_out <= N (got {n_in} -> {n_out})")
    if n_out == n_in:
        return images.clone()
    spec = torch.fft.rfft2(images)  # (..., N, N/2 + 1), ky in FFT order
    half = n_out // 2
    crop = torch.cat([spec[..., :half, :half + 1], spec[..., n_in - half:, :half + 1]], dim=-2)
    crop[..., half, :] = 0  # ky = -n_out/2
    crop[..., :, half] = 0  # kx = n_out/2
    return torch.fft.irfft2(crop, s=(n_out, n_out)) * (n_out / n_in) ** 2


def fourier_crop_3d(volume: torch.Tensor, n_out: int) -> torch.Tensor:
    """Downsample a volume (..., N, N, N) by cropping its centred spectrum; mean preserved."""
    n_in = volume.shape[-1]
    if n_out > n_in or n_out % 2 or n_in % 2:
        raise ValueError(f"fourier_crop_3d needs even sizes with n_out <= N (got {n_in} -> {n_out})")
    if n_out == n_in:
        return volume.clone()
    spec = fft3_c(volume)
    s = _crop_slices(n_in, n_out)
    spec = spec[..., s, s, s].clone()
    spec[..., 0, :, :] = 0
    spec[..., :, 0, :] = 0
    spec[..., :, :, 0] = 0
    return ifft3_c(spec).real * (n_out / n_in) ** 3


def pad_volume(volume: torch.Tensor, n_out: int) -> torch.Tensor:
    """Zero-pad a volume (..., N, N, N) to (..., n_out, n_out, n_out), keeping the centre N//2."""
    n_in = volume.shape[-1]
    before = n_out // 2 - n_in // 2
    after = n_out - n_in - before
    return torch.nn.functional.pad(volume, (before, after) * 3)


def crop_center_2d(images: torch.Tensor, n_out: int) -> torch.Tensor:
    """Crop the central (n_out, n_out) window of images (..., N, N), keeping the centre N//2."""
    s = _crop_slices(images.shape[-1], n_out)
    return images[..., s, s]
