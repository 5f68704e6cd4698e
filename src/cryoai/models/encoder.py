"""The pose encoder: Gaussian low-pass filter bank -> VGG-like CNN -> rotation and shift heads."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..physics.fft import fourier_crop_2d
from ..physics.rotations import rotation_6d_to_matrix, so3_grid

#: VGG16-like layout of the paper's release: ("conv", channels) / ("max"|"avg", None).
VGG_LAYOUT = (
    ("conv", 64), ("conv", 64), ("max", None),
    ("conv", 128), ("conv", 128), ("max", None),
    ("conv", 256), ("conv", 256), ("conv", 256), ("max", None),
    ("conv", 256), ("conv", 256), ("avg", None),
    ("conv", 256), ("conv", 256), ("avg", None),
    ("max", None),
)


#: Boxes from this size up feed the encoder half-size (Fourier-cropped) images by default.
AUTO_CROP_MIN_BOX_PX = 64


def encoder_input_size(setting: int | None, box_px: int) -> int:
    """The image size the encoder reads, in px, for an ``encoder_input_px`` setting.

    Parameters
    ----------
    setting : None for automatic, 0 for the full box, else a size in px (clipped to the box).
    box_px : the particle images' box.

    Returns
    -------
    The size, even. Automatic is half the box (rounded down to even) for boxes of
    :data:`AUTO_CROP_MIN_BOX_PX` and more, the full box below: the encoder then sees the
    frequencies up to half of Nyquist. Supervised pose regression (``bench/bench_encoder_input.py``,
    docs/benchmarks.md) learned as accurate poses per training minute from half-size images, and
    pose prediction is 3-4x faster.
    """
    if setting is None:
        return 2 * (box_px // 4) if box_px >= AUTO_CROP_MIN_BOX_PX else box_px
    if setting == 0:
        return box_px
    return min(int(setting), box_px)


class GaussianFilterBank(nn.Module):
    """Fixed bank of Gaussian low-pass filters stacked as channels, each standardised per image.

    Parameters
    ----------
    variances_px2 : variances of the Gaussian kernels in px^2 (the paper: 0.01 .. 100).
    kernel_size : odd kernel size (the paper: 11).

    Each kernel ``g g^T / sum(g)^2`` is separable, so the filtering (a zero-padded 2-D
    cross-correlation, as ``conv2d`` with ``padding = kernel_size // 2``) is computed as
    ``A X A^T`` with ``A`` the banded (N, N) matrix of the 1-D kernel: two matrix products, about
    15x faster on CPU than oneDNN's 11x11 convolution with one input channel (which took two
    thirds of the pose encoder's forward pass at 24 px).
    """

    def __init__(self, variances_px2=(0.01, 0.1, 1.0, 10.0, 100.0), kernel_size: int = 11):
        super().__init__()
        r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        kernels, kernels_1d = [], []
        for var in variances_px2:
            g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * var))
            kernels.append(g / g.sum())
            g1 = torch.exp(-r ** 2 / (2 * var))
            kernels_1d.append(g1 / g1.sum())
        # The 2-D kernels (C, 1, K, K), kept in the state dict as before; the 1-D factors (C, K).
        self.register_buffer("weight", torch.stack(kernels)[:, None].float())
        self.register_buffer("kernels_1d", torch.stack(kernels_1d).float(), persistent=False)
        self.padding = kernel_size // 2

    @property
    def n_channels(self) -> int:
        """Number of filters (output channels)."""
        return self.weight.shape[0]

    def banded(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(C, N, N) matrices ``A[c, i, m] = g_c[m - i + K // 2]`` (zero off the band)."""
        r = self.padding
        i = torch.arange(n, device=self.kernels_1d.device)
        offset = i[None, :] - i[:, None] + r
        inside = (offset >= 0) & (offset <= 2 * r)
        return (self.kernels_1d[:, offset.clamp(0, 2 * r)] * inside).to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, N) -> (B, C, N, N), each channel with zero mean and unit variance per image.

        The variance is the unbiased one (divisor N^2 - 1). It is computed as the norm of the
        centred values, in the precision of the filtering's output (float32 without autocast):
        two passes that vectorise, where ``Tensor.std`` runs a slower one-pass (Welford) loop.
        """
        b, n, _ = images.shape
        a = self.banded(n, images.dtype)  # (C, N, N)
        c = a.shape[0]
        # X A_c^T for every c at once: (B N, N) @ (N, C N) -> [b, m, c, j].
        rows = images.reshape(b * n, n) @ a.transpose(1, 2).permute(1, 0, 2).reshape(n, c * n)
        rows = rows.view(b, n, c, n).permute(2, 1, 0, 3).reshape(c, n, b * n)  # [c, m, (b, j)]
        x = torch.bmm(a, rows).view(c, n, b, n).permute(2, 0, 1, 3)  # A_c X A_c^T: (B, C, N, N)
        flat = x.reshape(b, c, n * n)
        centred = flat - flat.mean(dim=-1, keepdim=True)
        norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True, dtype=torch.float32)
        std = (norm / max(flat.shape[-1] - 1, 1) ** 0.5).clamp_min(1e-6)
        return centred.div_(std.to(centred.dtype)).view(b, c, n, n)


class PoseEncoder(nn.Module):
    """Images (B, N, N) -> rotations (B, H, 3, 3) and shifts (B, H, 2) in Angstrom.

    Parameters
    ----------
    box_px : image size N.
    width : channel multiplier of the VGG layout (1.0 = the paper's 64..256 channels).
    n_heads : number of rotation hypotheses per image (1 = cryoAI; >1 = multi-head,
        winner-takes-all as in CryoSPIN).
    max_shift_a : bound of the predicted shifts (tanh-scaled), Angstrom.
    head_hidden : widths of the MLP heads (the paper: 512, 256).
    filter_variances_px2 : variances of the input filter bank.
    input_px : if set and smaller than ``box_px``, images are Fourier-cropped to this size before
        the CNN (the poses are set by low and middle frequencies; the CNN costs ~(input_px)^2).
    bf16 : run the CNN and heads under bfloat16 autocast (weights and the 6D -> rotation map stay
        float32).

    The convolutions run in channels-last memory format (faster oneDNN/cuDNN kernels).
    """

    def __init__(self, box_px: int, *, width: float = 1.0, n_heads: int = 1, max_shift_a: float = 20.0,
                 head_hidden=(512, 256), filter_variances_px2=(0.01, 0.1, 1.0, 10.0, 100.0),
                 layout=VGG_LAYOUT, input_px: int | None = None, bf16: bool = False):
        super().__init__()
        self.box_px = box_px
        self.input_px = int(input_px) if input_px and input_px < box_px else box_px
        if self.input_px % 2:
            raise ValueError(f"encoder input size must be even (got {self.input_px})")
        self.bf16 = bool(bf16)
        self.n_heads = n_heads
        self.max_shift_a = max_shift_a
        self.filters = GaussianFilterBank(filter_variances_px2)
        self.features, n_features = vgg_features(self.filters.n_channels, self.input_px, width, layout)
        self.n_features = n_features

        def mlp(out_dim: int) -> nn.Sequential:
            mods: list[nn.Module] = []
            d = n_features
            for h in head_hidden:
                mods += [nn.Linear(d, h), nn.ReLU(inplace=True)]
                d = h
            mods.append(nn.Linear(d, out_dim))
            return nn.Sequential(*mods)

        self.rotation_head = mlp(6 * n_heads)
        self.shift_head = mlp(2)
        nn.init.zeros_(self.shift_head[-1].weight)
        nn.init.zeros_(self.shift_head[-1].bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """CNN features (B, n_features) of images (B, N, N)."""
        if self.input_px != images.shape[-1]:
            images = fourier_crop_2d(images, self.input_px)
        x = self.filters(images).contiguous(memory_format=torch.channels_last)
        if self.training or torch.is_grad_enabled():
            return self.features(x).flatten(1)
        return self._features_folded(x).flatten(1)

    def _features_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The CNN in inference, each BatchNorm folded into its convolution (:func:`_run_folded`)."""
        return _run_folded(self.features, x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, N, N) -> rotations (B, H, 3, 3) and shifts (B, H, 2) Angstrom, H heads."""
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.embed(images)
            six = self.rotation_head(feats)
            raw_shifts = self.shift_head(feats)
        rotations = rotation_6d_to_matrix(six.float().reshape(-1, self.n_heads, 6))
        shifts = self.max_shift_a * torch.tanh(raw_shifts.float() / max(self.max_shift_a, 1e-6))
        return rotations, shifts[:, None].expand(-1, self.n_heads, 2)


#: Default size of the images a :class:`PoseGridEncoder` reads (Fourier-cropped), px.
GRID_ENCODER_INPUT_PX = 24


def vgg_features(in_channels: int, size_px: int, width: float,
                 layout=VGG_LAYOUT) -> tuple[nn.Sequential, int]:
    """The VGG-like CNN of ``layout`` with channels times ``width``, for ``size_px`` inputs.

    Returns
    -------
    The module (channels-last) and its number of output features (channels x size^2).
    """
    layers: list[nn.Module] = []
    ch, size = in_channels, size_px
    for kind, out in layout:
        if kind == "conv":
            c = max(4, int(round(out * width)))
            layers += [nn.Conv2d(ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            ch = c
        elif size >= 2:
            layers.append(nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2))
            size //= 2
    return nn.Sequential(*layers).to(memory_format=torch.channels_last), ch * size * size


def _run_folded(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``features`` in inference with each BatchNorm (running statistics) folded into the
    convolution before it: the same function as ``features.eval()``, without the normalisation
    passes over the activations.
    """
    layers = list(features)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            bn = layers[i + 1]
            weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias)
            x = nn.functional.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation,
                                     layer.groups)
            i += 2
        else:
            x = layer(x)
            i += 1
    return x


class PoseGridEncoder(nn.Module):
    """Low-pass images (B, n, n) -> logits (B, G) over a fixed near-uniform SO(3) grid.

    The amortized pose stage's encoder: a distribution over the rotations of the grid (soft
    labels, cross-entropy), whose top K are the hypotheses that a scoring against the map and a
    local refinement turn into a pose (:mod:`cryoai.reconstruction.amortized`). A distribution
    keeps every mode of an ambiguous image, where a single regression averages them.

    Parameters
    ----------
    input_px : the (even) size of the images it reads: Fourier crops of the particles, made from
        phase-flipped spectra (:meth:`cryoai.models.image_formation.ImageFormation.low_pass_images`).
    n_rotations : target size of the grid (:func:`cryoai.physics.rotations.so3_grid`).
    width : channel multiplier of the VGG layout.
    hidden : width of the hidden layer of the head.
    band_px : the highest frequency (frequency px of the particles' box) of the images it reads,
        or None for all that ``input_px`` holds: the band of the map it learned from, so that
        real particles show it no detail that its simulated ones lacked.
    """

    def __init__(self, input_px: int = GRID_ENCODER_INPUT_PX, *, n_rotations: int = 4608, width: float = 0.25,
                 hidden: int = 512, band_px: float | None = None):
        super().__init__()
        if input_px % 2:
            raise ValueError(f"encoder input size must be even (got {input_px})")
        self.input_px = int(input_px)
        self.band_px = None if band_px is None else float(band_px)
        self.settings = {"input_px": self.input_px, "n_rotations": int(n_rotations), "width": float(width),
                         "hidden": int(hidden), "band_px": self.band_px}
        self.filters = GaussianFilterBank()
        self.features, n_features = vgg_features(self.filters.n_channels, self.input_px, width)
        self.register_buffer("grid", so3_grid(n_rotations), persistent=False)
        self.head = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, len(self.grid)))

    @property
    def grid_step_rad(self) -> float:
        """Typical spacing of the grid's rotations, radians."""
        return (8 * math.pi**2 / len(self.grid)) ** (1 / 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, G) of images (B, input_px, input_px)."""
        x = self.filters(images).contiguous(memory_format=torch.channels_last)
        if self.training or torch.is_grad_enabled():
            x = self.features(x)
        else:
            x = _run_folded(self.features, x)
        return self.head(x.flatten(1))

    @torch.no_grad()
    def hypotheses(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most probable grid rotations of each image.

        Returns
        -------
        indices (B, k) into :attr:`grid` and their probabilities (B, k), most probable first.
        """
        prob = torch.softmax(self(images).float(), dim=-1)
        p, idx = prob.topk(min(k, prob.shape[-1]), dim=-1)
        return idx, p


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["AUTO_CROP_MIN_BOX_PX", "GRID_ENCODER_INPUT_PX", "GaussianFilterBank", "PoseEncoder",
           "PoseGridEncoder", "VGG_LAYOUT", "count_parameters", "encoder_input_size", "vgg_features"]
