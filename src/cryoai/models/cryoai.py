"""The cryoAI model: encoder (image -> pose), physics decoder (pose -> image spectrum) and the
image formation between them (:mod:`cryoai.models.image_formation`: layout, CTF, 1/N scale).
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.grids import n_shells, shell_index
from .decoders import FourierNet, VoxelDecoder
from .encoder import PoseEncoder, encoder_input_size
from .image_formation import ImageFormation


class CryoAI(nn.Module):
    """Encoder + decoder + image formation.

    Parameters
    ----------
    box_px : N.
    pixel_size_a : Angstrom per pixel of the images the model works on.
    decoder : a module mapping (..., 3) frequency pixels to complex values (1/N scale).
    encoder : a :class:`PoseEncoder` or None (reconstruction with known or searched poses).

    Attributes
    ----------
    formation : the :class:`ImageFormation` (coefficient layout, CTF, spectra, render).
    """

    def __init__(self, box_px: int, pixel_size_a: float, decoder: nn.Module,
                 encoder: PoseEncoder | None = None):
        super().__init__()
        self.formation = ImageFormation(box_px, pixel_size_a)
        self.decoder = decoder
        self.encoder = encoder

    @property
    def box_px(self) -> int:
        """N, the image box in pixels."""
        return self.formation.box_px

    @property
    def pixel_size_a(self) -> float:
        """Angstrom per pixel."""
        return self.formation.pixel_size_a

    def image_spectra(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, N) real images -> (B, M) kept coefficients (:meth:`ImageFormation.spectra`)."""
        return self.formation.spectra(images)

    def render(self, rotations: torch.Tensor, shifts_a: torch.Tensor | None, ctf: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's predicted spectra (B, M') (:meth:`ImageFormation.render`).

        ``ctf`` is (B, M) over the whole layout (selected by ``keep`` here), or None.
        """
        if ctf is not None and keep is not None:
            ctf = ctf[:, keep]
        return self.formation.render(self.decoder, rotations, shifts_a, ctf, keep)


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
def estimate_amplitude_profile(formation: ImageFormation, batch) -> torch.Tensor:
    """Expected decoder amplitude (``|fft3_c(volume)| / N``) per integer frequency shell.

    ``sqrt(mean |Y|^2 / mean C^2)`` per shell of the kept coefficients (the CTF-corrected
    radial amplitude of the data); shells beyond the data are given the last value.
    Returns (N//2 + 1,).
    """
    y = formation.spectra(batch.images)
    c = formation.ctf(batch)
    shells = shell_index(formation.radius_px)
    power = torch.zeros(n_shells(formation.box_px), dtype=torch.float64, device=y.device)
    ctf2 = torch.zeros_like(power)
    power.index_add_(0, shells, (y.abs() ** 2).double().mean(0))
    ctf2.index_add_(0, shells, (c**2).double().mean(0))
    prof = torch.sqrt(power / ctf2.clamp_min(1e-3))
    filled = prof > 0
    last = int(torch.nonzero(filled)[-1])
    prof[last + 1:] = prof[last]
    return prof.float()
