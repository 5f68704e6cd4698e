"""Image formation: how a Fourier volume and a pose make a particle image's spectrum.

One object owns what every stage (pose search, reconstruction, training, pose prediction)
needs to compare a volume with images, as cryojax's ``InstrumentConfig`` does:

- the **coefficient layout**: the Hermitian half of the centred 2D spectrum inside the largest
  paired radius (``N//2 - 1``), as frequency pixels ``coords_px`` (M, 2), their radius, their
  Hermitian weights (2 for a coefficient whose mirror ``-k`` is left out, 1 for DC), and the
  index that gathers them from a real FFT;
- the **1/N Fourier scale** (CONVENTIONS.md): image spectra are ``fft2_c(image) / N`` and
  decoder volumes ``fft3_c(volume) / N``, so a central slice of the volume equals the spectrum
  of its projection, and by Parseval the weighted squared error over the kept coefficients is
  the real-space squared error;
- the **CTF** of a batch and the **phase shift** of a translation, at the kept frequencies;
- **render**: slice a decoder at rotated coordinates (Fourier slice theorem), times the phase
  shift, times the CTF.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.noise import ring_interpolate
from ..physics.ctf import compute_ctf
from ..physics.fft import fft2_c, half_spectrum, half_spectrum_index, ifft2_c
from ..physics.grids import grid_2d, half_plane_mask
from ..physics.projection import slice_coords
from ..physics.shifts import phase_shift


class ImageFormation(nn.Module):
    """Coefficient layout, CTF, spectra and rendering for images of one box and pixel size.

    A module only so that its buffers follow ``.to(device)``; it has no parameters and no
    persistent state (nothing of it is saved in checkpoints).

    Parameters
    ----------
    box_px : N, the (even) image box in pixels.
    pixel_size_a : Angstrom per pixel.

    Attributes
    ----------
    coords_px : (M, 2) float32, the kept frequencies ``(kx, ky)`` in frequency pixels (cycles
        per box).
    radius_px : (M,) their distance from DC, frequency pixels.
    hermitian_weight : (M,) 2 for every coefficient but DC (1): sums over the kept half times
        these weights are sums over the full spectrum.
    fourier_scale : 1/N, the factor of every spectrum this object makes.
    """

    def __init__(self, box_px: int, pixel_size_a: float):
        super().__init__()
        self.box_px = int(box_px)
        self.pixel_size_a = float(pixel_size_a)
        self.fourier_scale = 1.0 / self.box_px
        mask = half_plane_mask(box_px)
        g = grid_2d(box_px)
        coords = g[mask]
        self.register_buffer("half_mask", mask, persistent=False)
        self.register_buffer("coords_px", coords, persistent=False)
        self.register_buffer("radius_px", coords.norm(dim=-1), persistent=False)
        w = torch.full((len(coords),), 2.0)
        w[(coords == 0).all(-1)] = 1.0
        self.register_buffer("hermitian_weight", w, persistent=False)
        self._real_fft = box_px % 2 == 0  # kept coefficients gathered from a real FFT
        if self._real_fft:
            flat_index, sign = half_spectrum_index(coords, box_px)
            self.register_buffer("rfft_index", flat_index, persistent=False)
            self.register_buffer("rfft_sign", sign / self.box_px, persistent=False)

    @property
    def freqs_a(self) -> torch.Tensor:
        """Frequencies of the kept coefficients, cycles per Angstrom, (M, 2)."""
        return self.coords_px / (self.box_px * self.pixel_size_a)

    @property
    def freqs_px(self) -> torch.Tensor:
        """Frequencies of the kept coefficients, cycles per pixel (for shifts in pixels), (M, 2)."""
        return self.coords_px / self.box_px

    def band(self, radius_px: float) -> torch.Tensor:
        """Boolean (M,): the kept coefficients within ``radius_px`` frequency pixels of DC."""
        return self.radius_px <= radius_px

    def spectra(self, images: torch.Tensor) -> torch.Tensor:
        """Kept coefficients of real images: (B, N, N) -> (B, M) complex ``fft2_c(img) / N``."""
        if self._real_fft:
            return half_spectrum(images, self.rfft_index, self.rfft_sign)
        return fft2_c(images)[:, self.half_mask] / self.box_px

    def low_pass_images(self, spectra: torch.Tensor, n_out: int) -> torch.Tensor:
        """Real images (B, n_out, n_out) made from the kept coefficients ``|kx|, |ky| < n_out / 2``
        of spectra (B, M): the Fourier crop of the images the spectra came from
        (:func:`cryoai.physics.fft.fourier_crop_2d`, same values), made without the full
        images (e.g. from phase-flipped or simulated spectra).

        Parameters
        ----------
        spectra : (B, M) complex, this layout's coefficients (1/N scale).
        n_out : even output box, at most N.

        Returns
        -------
        (B, n_out, n_out) real, pixel size ``pixel_size_a * N / n_out``.
        """
        half = n_out // 2
        if n_out % 2 or n_out > self.box_px:
            raise ValueError(f"low_pass_images needs an even size up to {self.box_px} (got {n_out})")
        inside = (self.coords_px.abs() < half).all(-1)
        kx, ky = self.coords_px[inside].long().unbind(-1)
        values = spectra[:, inside]
        grid = torch.zeros(spectra.shape[0], n_out, n_out, dtype=spectra.dtype, device=spectra.device)
        # Each kept coefficient and its Hermitian mirror (DC twice: halved by the real part's sum).
        grid[:, ky + half, kx + half] = values
        grid[:, half - ky, half - kx] = values.conj()
        return ifft2_c(grid).real * (n_out**2 / self.box_px)

    def ctf(self, batch) -> torch.Tensor:
        """CTF of each image of a batch at the kept coefficients, (B, M).

        ``batch`` is a :class:`cryoai.data.dataset.ParticleBatch` (or any object with its CTF
        fields as (B,) tensors). When the batch carries a whitening filter (B, R), the CTF is
        multiplied by it, as the batch's images were.
        """
        ctf = compute_ctf(self.freqs_a, batch.defocus_u_a, batch.defocus_v_a, batch.defocus_angle_rad,
                          batch.voltage_kv, batch.cs_mm, batch.amplitude_contrast,
                          batch.phase_shift_rad, batch.bfactor_a2)
        whitening = getattr(batch, "whitening", None)
        if whitening is not None:
            # Whitened images (cryoai.data.noise): the same filter at each coefficient's radius.
            ctf = ctf * ring_interpolate(whitening.to(ctf.device, ctf.dtype), self.radius_px)
        return ctf

    def phase(self, shifts_a: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Phase factors (B, M') that translate images by ``shifts_a`` (B, 2) Angstrom."""
        freqs = self.freqs_a if keep is None else self.freqs_a[keep]
        return phase_shift(freqs, shifts_a)

    def render(self, decoder: nn.Module, rotations: torch.Tensor, shifts_a: torch.Tensor | None,
               ctf: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted spectra (B, M') of images of a volume with poses, shifts and CTF.

        Parameters
        ----------
        decoder : a module mapping (..., 3) frequency pixels to complex values (1/N scale).
        rotations : (B, 3, 3), image frame -> volume frame (CONVENTIONS.md).
        shifts_a : (B, 2) Angstrom, or None (no translation).
        ctf : (B, M') at the selected coefficients, or None (no CTF).
        keep : optional boolean (M,) selecting coefficients (e.g. a frequency band); M' = its
            count, or M.

        Returns
        -------
        (B, M') complex: ``CTF * T_shift * V(R @ (kx, ky, 0))``, multiplied in that order
        (slice, then phase, then CTF).
        """
        coords = self.coords_px if keep is None else self.coords_px[keep]
        values = decoder(slice_coords(rotations, coords))
        if shifts_a is not None:
            values = values * self.phase(shifts_a, keep)
        if ctf is not None:
            values = values * ctf
        return values
