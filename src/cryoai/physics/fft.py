"""Centred FFTs and Fourier cropping/padding.

Centred means the zero frequency sits at index ``N//2`` of every transformed axis:
``fft2_c(x) = fftshift(fft2(ifftshift(x)))`` with backward normalisation.
"""

from __future__ import annotations

import torch


def fft2_c(images: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT over the last two axes.

    Parameters
    ----------
    images : (..., N, N) real or complex tensor, indexed [y, x].

    Returns
    -------
    (..., N, N) complex tensor, DC at [N//2, N//2].
    """
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=dims), dim=dims), dim=dims)


def ifft2_c(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_c` (complex output; take ``.real`` for real images)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=dims), dim=dims), dim=dims)


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
    """
    n_in = images.shape[-1]
    if n_out > n_in or n_out % 2 or n_in % 2:
        raise ValueError(f"fourier_crop_2d needs even sizes with n_out <= N (got {n_in} -> {n_out})")
    if n_out == n_in:
        return images.clone()
    spec = fft2_c(images)
    s = _crop_slices(n_in, n_out)
    spec = spec[..., s, s].clone()
    # The new Nyquist row/column has no partner: drop its imaginary part to keep output real.
    spec[..., 0, :] = 0
    spec[..., :, 0] = 0
    return ifft2_c(spec).real * (n_out / n_in) ** 2


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
