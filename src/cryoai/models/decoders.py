"""Decoders: representations of a volume's centred Fourier transform V(k).

Both decoders take points ``k = (kx, ky, kz)`` in frequency pixels (cycles per box; Nyquist at
``N/2``) and return complex values. Hermitian symmetry ``V(-k) = conj(V(k))`` holds by
construction: a point in the lower half-space is evaluated at ``-k`` and conjugated, and the
value at ``k = 0`` is real.

A decoder represents ``fft3_c(volume) / N``: the same ``1/N`` as
:meth:`cryoai.models.cryoai.CryoAI.image_spectra`, so that its central slice at a pose is the
model's prediction of ``image_spectra`` of the projection (``fft2_c(volume.sum(0)) / N`` for
the identity pose). :func:`decoder_to_volume` undoes the factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..physics.fft import fft3_c, ifft3_c
from ..physics.grids import in_half_space, n_shells, radius_grid_3d, shell_index
from ..physics.projection import sample_channels


def hermitian_eval(fn, coords: torch.Tensor) -> torch.Tensor:
    """Evaluate ``fn`` (points -> complex) so that the result is Hermitian in ``coords``.

    Points outside :func:`cryoai.physics.grids.in_half_space` (the lower half space: z < 0, or
    z == 0 and (y < 0, or y == 0 and x < 0)) are evaluated at ``-k`` and conjugated.
    """
    lower = ~in_half_space(coords)
    sign = torch.where(lower, -1.0, 1.0).to(coords.dtype)[..., None]
    values = fn(coords * sign)
    values = torch.where(lower, values.conj(), values)
    # k = 0 is its own partner: V(0) = conj(V(0)) must be real.
    origin = (coords == 0).all(-1)
    return torch.where(origin, torch.complex(values.real, torch.zeros_like(values.real)), values)


class SineLayer(nn.Module):
    """``sin(omega_0 * (W x + b))`` with SIREN initialisation (Sitzmann et al. 2020)."""

    def __init__(self, in_features: int, out_features: int, omega_0: float, is_first: bool):
        super().__init__()
        self.omega_0 = omega_0
        self.linear = nn.Linear(in_features, out_features)
        with torch.no_grad():
            bound = 1 / in_features if is_first else math.sqrt(6 / in_features) / omega_0
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        return torch.sin(self.omega_0 * self.linear(x))


class Siren(nn.Module):
    """A SIREN: ``n_layers`` sine layers of ``width`` then a linear layer to ``out_features``."""

    def __init__(self, in_features: int, width: int, n_layers: int, out_features: int,
                 omega_0: float = 30.0, hidden_omega_0: float = 30.0):
        super().__init__()
        layers = [SineLayer(in_features, width, omega_0, True)]
        layers += [SineLayer(width, width, hidden_omega_0, False) for _ in range(n_layers - 1)]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_features)
        with torch.no_grad():
            bound = math.sqrt(6 / width) / hidden_omega_0
            self.out.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        return self.out(self.net(x))


class FourierNet(nn.Module):
    """The paper's FourierNet: ``V(k) = exp(envelope(k)) * modulant(k)`` as a complex number.

    Two SIRENs on coordinates scaled so that Nyquist is 1: a "modulant" (2 outputs: real and
    imaginary parts) and an "envelope" (2 outputs, exponentiated element-wise), multiplied
    element-wise.

    Parameters
    ----------
    box_px : N.
    width : hidden width of both SIRENs (the paper: 256).
    modulant_layers, envelope_layers : number of sine layers (the paper: 4 and 3).
    modulant_omega_0, envelope_omega_0 : first-layer frequencies (the paper: 40 and 30).
    """

    def __init__(self, box_px: int, *, width: int = 256, modulant_layers: int = 4,
                 envelope_layers: int = 3, modulant_omega_0: float = 40.0,
                 envelope_omega_0: float = 30.0):
        super().__init__()
        self.box_px = box_px
        self.modulant = Siren(3, width, modulant_layers, 2, omega_0=modulant_omega_0)
        self.envelope = Siren(3, width, envelope_layers, 2, omega_0=envelope_omega_0)

    def half_space_values(self, coords: torch.Tensor) -> torch.Tensor:
        """Values at points of the upper half space (no Hermitian fold), (..., 3) -> (...) complex."""
        x = coords / (self.box_px / 2)
        out = torch.exp(self.envelope(x)) * self.modulant(x)
        return torch.complex(out[..., 0], out[..., 1])

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) frequency pixels -> (...) complex Fourier values."""
        return hermitian_eval(self.half_space_values, coords)


class VoxelDecoder(nn.Module):
    """An explicit complex Fourier grid (N, N, N), sampled by trilinear interpolation.

    Stored as a real tensor (2, N, N, N) (real and imaginary parts) times a fixed radial
    amplitude profile ``a(|k|)`` (a preconditioner: Fourier amplitudes of a molecule fall by
    orders of magnitude from DC to Nyquist, so a plain grid would need very different step
    sizes per frequency). Initialised from ``fft3_c(volume) / N`` of a given real volume (see the
    module docstring), or zeros.

    Parameters
    ----------
    box_px : N.
    init_volume : optional (N, N, N) real volume.
    amplitude_profile : optional (N//2 + 1,) expected amplitude per integer shell (default 1).
    """

    def __init__(self, box_px: int, init_volume: torch.Tensor | None = None,
                 amplitude_profile: torch.Tensor | None = None):
        super().__init__()
        self.box_px = box_px
        shells = shell_index(radius_grid_3d(box_px)).clamp(max=n_shells(box_px) - 1)  # corners -> Nyquist
        profile = torch.ones(n_shells(box_px)) if amplitude_profile is None else amplitude_profile.float()
        self.register_buffer("scale", profile[shells].clamp_min(1e-12))
        grid = torch.zeros(2, box_px, box_px, box_px)
        if init_volume is not None:
            f = fft3_c(init_volume.to(torch.float32)) / (box_px * self.scale)
            grid = torch.stack([f.real, f.imag])
        self.grid = nn.Parameter(grid)

    def fourier_volume(self) -> torch.Tensor:
        """The whole grid as a complex (N, N, N) Fourier volume, 1/N scale."""
        return torch.complex(self.grid[0] * self.scale, self.grid[1] * self.scale)

    def half_space_values(self, coords: torch.Tensor) -> torch.Tensor:
        """Values at points of the upper half space (no Hermitian fold), (..., 3) -> (...) complex."""
        # Sample the real and imaginary channels as stored: no complex volume is built.
        out = sample_channels(self.grid * self.scale, coords)
        return torch.complex(out[0], out[1])

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) frequency pixels -> (...) complex Fourier values (Hermitian)."""
        return hermitian_eval(self.half_space_values, coords)


@torch.no_grad()
def decoder_to_volume(decoder: nn.Module, box_px: int, *, chunk: int = 65536) -> torch.Tensor:
    """The real-space volume (N, N, N) [z, y, x] that a decoder represents.

    Evaluates the decoder on the full centred Fourier grid inside the Nyquist sphere (zero
    outside), multiplies by ``N`` (decoders hold ``fft3_c(volume) / N``) and inverts it; the
    imaginary part of the inverse is discarded.
    """
    from ..physics.grids import grid_3d

    device = next(decoder.parameters()).device
    if isinstance(decoder, VoxelDecoder):
        f = decoder.fourier_volume().detach()
        # Symmetrise exactly (the grid itself is free; sampling enforces symmetry at use).
        flipped = torch.roll(torch.flip(f, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
        f = 0.5 * (f + flipped.conj())
    else:
        g = grid_3d(box_px, device=device).reshape(-1, 3)
        inside = g.norm(dim=-1) <= box_px // 2
        values = torch.zeros(g.shape[0], dtype=torch.complex64, device=device)
        pts = g[inside]
        out = [decoder(pts[i:i + chunk]) for i in range(0, len(pts), chunk)]
        values[inside] = torch.cat(out).to(values.dtype)
        f = values.reshape(box_px, box_px, box_px)
    return ifft3_c(f).real * box_px
