"""The cryoAI model: encoder (image -> pose) and physics decoder (pose -> image spectrum).

Predictions live on a Hermitian half of the centred 2D spectrum, inside a radius (the rest
follows by symmetry). Image spectra are scaled by 1/N so that, by Parseval, the squared error
summed over the full spectrum equals the real-space squared error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.ctf import compute_ctf
from ..physics.fft import fft2_c, half_spectrum, half_spectrum_index
from ..physics.grids import grid_2d, half_plane_mask
from ..physics.projection import slice_coords
from ..physics.shifts import phase_shift
from .decoders import FourierNet, VoxelDecoder
from .encoder import PoseEncoder, encoder_input_size


class CryoAI(nn.Module):
    """Encoder + decoder + image formation.

    Parameters
    ----------
    box_px : N.
    pixel_size_a : Angstrom per pixel of the images the model works on.
    decoder : a module mapping (..., 3) frequency pixels to complex values.
    encoder : a :class:`PoseEncoder` or None (reconstruction with known poses).
    """

    def __init__(self, box_px: int, pixel_size_a: float, decoder: nn.Module,
                 encoder: PoseEncoder | None = None):
        super().__init__()
        self.box_px = box_px
        self.pixel_size_a = float(pixel_size_a)
        self.decoder = decoder
        self.encoder = encoder
        mask = half_plane_mask(box_px)
        g = grid_2d(box_px)
        self.register_buffer("half_mask", mask, persistent=False)
        self.register_buffer("coords_2d", g[mask], persistent=False)  # (M, 2) frequency px
        self.register_buffer("radius", g[mask].norm(dim=-1), persistent=False)  # (M,)
        # Weight 2 for coefficients whose Hermitian partner is left out, 1 for DC.
        w = torch.full((int(mask.sum()),), 2.0)
        w[(g[mask] == 0).all(-1)] = 1.0
        self.register_buffer("hermitian_weight", w, persistent=False)
        self._real_fft = box_px % 2 == 0  # kept coefficients gathered from a real FFT
        if self._real_fft:
            flat_index, sign = half_spectrum_index(g[mask], box_px)
            self.register_buffer("rfft_index", flat_index, persistent=False)
            self.register_buffer("rfft_sign", sign / box_px, persistent=False)

    @property
    def freqs_a(self) -> torch.Tensor:
        """Frequencies of the kept coefficients, cycles per Angstrom (M, 2)."""
        return self.coords_2d / (self.box_px * self.pixel_size_a)

    def image_spectra(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, N) real images -> (B, M) complex kept coefficients of ``fft2_c(img) / N``."""
        if self._real_fft:
            return half_spectrum(images, self.rfft_index, self.rfft_sign)
        return fft2_c(images)[:, self.half_mask] / self.box_px

    def ctf(self, batch: dict) -> torch.Tensor:
        """CTF of each image at the kept coefficients, (B, M)."""
        return compute_ctf(self.freqs_a, batch["defocus_u_a"], batch["defocus_v_a"],
                           batch["defocus_angle_rad"], batch["voltage_kv"], batch["cs_mm"],
                           batch["amplitude_contrast"], batch["phase_shift_rad"], batch["bfactor_a2"])

    def render(self, rotations: torch.Tensor, shifts_a: torch.Tensor | None, ctf: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted spectra (B, M') of images with poses, CTF and shifts.

        Parameters
        ----------
        rotations : (B, 3, 3).
        shifts_a : (B, 2) Angstrom, or None.
        ctf : (B, M) or None.
        keep : optional boolean (M,) selecting coefficients (e.g. a frequency band).
        """
        coords = self.coords_2d if keep is None else self.coords_2d[keep]
        pts = slice_coords(rotations, coords)
        values = self.decoder(pts)
        if ctf is not None:
            values = values * (ctf if keep is None else ctf[:, keep])
        if shifts_a is not None:
            freqs = self.freqs_a if keep is None else self.freqs_a[keep]
            values = values * phase_shift(freqs, shifts_a)
        return values


def use_bf16(precision: str, device: torch.device | str | None) -> bool:
    """Whether ``precision`` ("fp32", "bf16" or "auto") means bfloat16 autocast on ``device``.

    "auto" is bf16 where the hardware computes it natively: CUDA devices that support it, and
    CPUs whose oneDNN has bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 would be emulated
    and slower than fp32.
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def build_model(cfg, box_px: int, pixel_size_a: float, *, with_encoder: bool = True,
                init_volume: torch.Tensor | None = None,
                amplitude_profile: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> CryoAI:
    """A CryoAI model from a :class:`cryoai.training.config.TrainConfig`.

    ``amplitude_profile`` (N//2 + 1,) preconditions the voxel decoder (see VoxelDecoder).
    ``device`` decides what ``cfg.precision == "auto"`` means (see :func:`use_bf16`).
    """
    if cfg.decoder == "fouriernet":
        decoder: nn.Module = FourierNet(box_px, width=cfg.fouriernet_width)
    else:
        decoder = VoxelDecoder(box_px, init_volume=init_volume, amplitude_profile=amplitude_profile)
    encoder = None
    if with_encoder:
        max_shift = cfg.max_shift_a if cfg.max_shift_a is not None else 0.15 * box_px * pixel_size_a
        encoder = PoseEncoder(box_px, width=cfg.encoder_width, n_heads=cfg.encoder_heads,
                              max_shift_a=max_shift,
                              input_px=encoder_input_size(cfg.encoder_input_px, box_px),
                              bf16=use_bf16(cfg.precision, device))
    return CryoAI(box_px, pixel_size_a, decoder, encoder)


@torch.no_grad()
def estimate_amplitude_profile(model: CryoAI, batch: dict) -> torch.Tensor:
    """Expected decoder amplitude (``|fft3_c(volume)| / N``) per integer frequency shell.

    ``sqrt(mean |Y|^2 / mean C^2)`` per shell of the kept coefficients (the CTF-corrected
    radial amplitude of the data); shells beyond the data are given the last value.
    Returns (N//2 + 1,).
    """
    y = model.image_spectra(batch["images"])
    c = model.ctf(batch)
    shells = torch.round(model.radius).long()
    n_shells = model.box_px // 2 + 1
    power = torch.zeros(n_shells, dtype=torch.float64, device=y.device)
    ctf2 = torch.zeros_like(power)
    power.index_add_(0, shells, (y.abs() ** 2).double().mean(0))
    ctf2.index_add_(0, shells, (c**2).double().mean(0))
    prof = torch.sqrt(power / ctf2.clamp_min(1e-3))
    filled = prof > 0
    last = int(torch.nonzero(filled)[-1])
    prof[last + 1:] = prof[last]
    return prof.float()
