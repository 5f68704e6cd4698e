"""Decoders, encoder and the image-formation model (cryoai.models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cryoai.assets import embedded_map_path
from cryoai.io.mrc import read_volume
from cryoai.models.cryoai import CryoAI
from cryoai.models.decoders import FourierNet, VoxelDecoder, decoder_to_volume
from cryoai.models.encoder import GaussianFilterBank, PoseEncoder
from cryoai.physics.fft import fft2_c, fft3_c, fourier_crop_3d, ifft3_c
from cryoai.physics.grids import radius_grid_3d
from cryoai.physics.projection import project_fourier
from cryoai.physics.rotations import random_rotations, rot_z
from cryoai.physics.shifts import shift_images

N = 32
PIXEL_A = 10.0




@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    """The embedded ribosome Fourier-cropped to 32^3, float32, [z, y, x]."""
    vol, _ = read_volume(embedded_map_path())
    return fourier_crop_3d(torch.as_tensor(vol, dtype=torch.float64), N).float()


def _random_points(n: int, gen: torch.Generator, radius: float) -> torch.Tensor:
    """Random frequency points inside a ball, with some on the z = 0 plane, on the x axis
    and the origin."""
    pts = (torch.rand(n, 3, generator=gen) * 2 - 1) * radius / math.sqrt(3)
    pts[: n // 4, 2] = 0.0  # on the z = 0 plane
    pts[n // 4: n // 4 + 8, 1:] = 0.0  # on the x axis (y = z = 0)
    pts[-1] = 0.0  # the origin
    half = int(radius) // 2
    grid_pts = torch.randint(-half, half + 1, (16, 3), generator=gen).float()
    grid_pts[:8, 2] = 0  # integer points on the z = 0 plane
    return torch.cat([pts, grid_pts])


def _assert_hermitian(decoder: nn.Module, pts: torch.Tensor) -> None:
    with torch.no_grad():
        plus = decoder(pts)
        minus = decoder(-pts)
    assert plus.is_complex()
    assert plus.abs().max() > 0
    torch.testing.assert_close(minus, plus.conj(), rtol=0, atol=1e-6 * float(plus.abs().max()))
    # In particular the value at k = 0 is real.
    origin = (pts == 0).all(-1)
    assert origin.any()
    assert float(plus[origin].imag.abs().max()) == 0.0


def test_fouriernet_is_hermitian():
    torch.manual_seed(0)
    decoder = FourierNet(N, width=32)
    gen = torch.Generator().manual_seed(1)
    _assert_hermitian(decoder, _random_points(200, gen, N / 2 - 1))


def test_voxel_decoder_is_hermitian():
    gen = torch.Generator().manual_seed(2)
    # A random grid (not the transform of a real volume): symmetry must come from the decoder.
    decoder = VoxelDecoder(N)
    with torch.no_grad():
        decoder.grid.normal_(generator=gen)
    _assert_hermitian(decoder, _random_points(200, gen, N / 2 - 1))


def test_voxel_decoder_round_trip(volume):
    decoder = VoxelDecoder(N, init_volume=volume)
    out = decoder_to_volume(decoder, N)
    scale = float(volume.abs().max())
    torch.testing.assert_close(out, volume, rtol=0, atol=1e-5 * scale)


def test_voxel_decoder_round_trip_with_amplitude_profile(volume):
    profile = torch.exp(-torch.arange(N // 2 + 1, dtype=torch.float32) / 3.0) * 50.0
    decoder = VoxelDecoder(N, init_volume=volume, amplitude_profile=profile)
    # The parameters are preconditioned: the grid holds the transform divided by the profile.
    assert not torch.allclose(decoder.grid, VoxelDecoder(N, init_volume=volume).grid)
    out = decoder_to_volume(decoder, N)
    scale = float(volume.abs().max())
    torch.testing.assert_close(out, volume, rtol=0, atol=1e-5 * scale)


class _Wrapped(nn.Module):
    """A decoder that is not a VoxelDecoder, so decoder_to_volume takes its generic path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, coords):
        return self.inner(coords)


def test_decoder_to_volume_generic_path_matches(volume):
    # A volume band-limited inside the Nyquist sphere: the generic path (sampling the decoder
    # on the grid inside the sphere) must give it back, with the same scale as the voxel path.
    f = fft3_c(volume.double())
    f[radius_grid_3d(N, dtype=torch.float64) > N // 2 - 1] = 0
    band_limited = ifft3_c(f).real.float()
    decoder = VoxelDecoder(N, init_volume=band_limited)
    out = decoder_to_volume(_Wrapped(decoder), N)
    scale = float(band_limited.abs().max())
    torch.testing.assert_close(out, band_limited, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("n_heads", [1, 3])
def test_pose_encoder_outputs(n_heads):
    torch.manual_seed(0)
    max_shift = 7.5
    enc = PoseEncoder(N, width=0.125, n_heads=n_heads, max_shift_a=max_shift)
    # The shift head starts at zero; make it large so the bound is exercised.
    with torch.no_grad():
        enc.shift_head[-1].weight.normal_(0.0, 50.0)
        enc.shift_head[-1].bias.normal_(0.0, 50.0)
    images = torch.randn(5, N, N) * 3 + 1
    with torch.no_grad():
        rot, shifts = enc(images)
    assert rot.shape == (5, n_heads, 3, 3)
    assert shifts.shape == (5, n_heads, 2)
    eye = torch.eye(3).expand_as(rot)
    torch.testing.assert_close(rot.transpose(-1, -2) @ rot, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(5, n_heads), rtol=0, atol=1e-5)
    assert float(shifts.abs().max()) <= max_shift * (1 + 1e-6)
    assert float(shifts.abs().max()) > 0.5 * max_shift
    # Different images get different rotations; heads are distinct hypotheses.
    assert not torch.allclose(rot[0], rot[1], atol=1e-4)
    if n_heads > 1:
        assert not torch.allclose(rot[:, 0], rot[:, 1], atol=1e-4)


def test_pose_encoder_bf16_and_cropped_input():
    """bf16 autocast gives proper rotations close to the fp32 ones of the same weights; a
    Fourier-cropped input keeps the output shapes and sees the cropped image."""
    torch.manual_seed(1)
    enc = PoseEncoder(N, width=0.125).eval()
    enc16 = PoseEncoder(N, width=0.125, bf16=True).eval()
    enc16.load_state_dict(enc.state_dict())
    images = torch.randn(6, N, N)
    with torch.no_grad():
        r32, _ = enc(images)
        r16, _ = enc16(images)
    assert r16.dtype == torch.float32
    eye = torch.eye(3).expand_as(r16)
    torch.testing.assert_close(r16.transpose(-1, -2) @ r16, eye, rtol=0, atol=1e-5)
    trace = (r16.transpose(-1, -2) @ r32).diagonal(dim1=-2, dim2=-1).sum(-1)
    angle = torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))
    assert float(angle.max()) < 5.0, angle
    small = PoseEncoder(N, width=0.125, input_px=N // 2)
    assert small.input_px == N // 2
    with torch.no_grad():
        rot, shifts = small(images)
    assert rot.shape == (6, 1, 3, 3) and shifts.shape == (6, 1, 2)
    # Only the cropped band reaches the CNN: removing frequencies beyond it changes nothing.
    c = torch.arange(N)
    checkerboard = (-1.0) ** (c[:, None] + c[None, :])  # Nyquist: outside the cropped band
    with torch.no_grad():
        feats = small.embed(images)
        torch.testing.assert_close(small.embed(images + 5 * checkerboard), feats, rtol=0,
                                   atol=1e-4 * float(feats.abs().max()))
        full = enc.embed(images)
        assert (enc.embed(images + 5 * checkerboard) - full).abs().max() > 0.1 * full.abs().max()


def test_pose_encoder_inference_folds_batchnorm():
    """In eval mode without gradients the BatchNorms are folded into the convolutions: the same
    function as the layer-by-layer CNN (with gradients on), with trained running statistics."""
    torch.manual_seed(3)
    enc = PoseEncoder(N, width=0.125)
    with torch.no_grad():
        for _ in range(3):  # running statistics far from the (0, 1) of a fresh BatchNorm
            enc(torch.randn(8, N, N) * 3 + 1)
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    enc.eval()
    images = torch.randn(5, N, N)
    x = enc.filters(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        folded = enc._features_folded(x)
        r_fast, t_fast = enc(images)
    reference = enc.features(x)  # gradients on: the module path with BatchNorm layers
    assert reference.requires_grad
    reference = reference.detach()
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    r_ref, t_ref = enc(images)
    torch.testing.assert_close(r_fast, r_ref.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(t_fast, t_ref.detach(), rtol=0, atol=1e-4)


def test_gaussian_filter_bank_matches_direct_convolution():
    """The bank equals a direct convolution with the 11 x 11 Gaussians of the paper (zero padded),
    each channel standardised with the unbiased standard deviation (independent numpy/scipy
    reference)."""
    from scipy.signal import convolve2d

    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, N, N)) * 4 + 2
    bank = GaussianFilterBank()
    out = bank(torch.as_tensor(images, dtype=torch.float32)).numpy()
    r = np.arange(11) - 5
    for c, var in enumerate((0.01, 0.1, 1.0, 10.0, 100.0)):
        kernel = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * var))
        kernel /= kernel.sum()
        for b in range(3):
            ref = convolve2d(images[b], kernel, mode="same")
            ref = (ref - ref.mean()) / ref.std(ddof=1)
            np.testing.assert_allclose(out[b, c], ref, rtol=0, atol=2e-4)


def test_gaussian_filter_bank_standardised():
    torch.manual_seed(0)
    bank = GaussianFilterBank()
    images = torch.randn(4, N, N) * 7 + 3
    out = bank(images)
    assert out.shape == (4, bank.n_channels, N, N)
    mean = out.mean(dim=(-2, -1))
    std = out.std(dim=(-2, -1))
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-4)
    # The channels are low-passed by increasing amounts: less high-frequency energy (the
    # widest kernel is truncated at 11 px, so it is only compared with the sharpest).
    rough = (out.diff(dim=-1) ** 2).mean(dim=(0, 2, 3))
    assert bool((rough[1:4] < rough[:3]).all())
    assert rough[4] < 0.1 * rough[0]


def _render_case(volume, rotations, shifts_px):
    model = CryoAI(N, PIXEL_A, VoxelDecoder(N, init_volume=volume))
    with torch.no_grad():
        pred = model.render(rotations, shifts_px * PIXEL_A, None)
    proj = project_fourier(volume, rotations, oversample=1)
    images = shift_images(proj, shifts_px)
    return model, pred, model.image_spectra(images)


def test_render_identity_is_central_slice(volume):
    eye = torch.eye(3)[None]
    model, pred, target = _render_case(volume, eye, torch.zeros(1, 2))
    scale = float(target.abs().max())
    # The prediction of the noise-free image equals image_spectra of its projection ...
    torch.testing.assert_close(pred, target, rtol=0, atol=1e-5 * scale)
    # ... which is the central slice fft2_c(volume.sum(0)) / N at the kept coefficients.
    central = fft2_c(volume.sum(0))[model.formation.half_mask] / N
    torch.testing.assert_close(pred[0], central, rtol=0, atol=1e-5 * scale)
    # And with a CTF, the prediction is multiplied by it.
    ctf = torch.linspace(-1, 1, pred.shape[-1])[None]
    with torch.no_grad():
        pred_ctf = model.render(eye, torch.zeros(1, 2), ctf)
    torch.testing.assert_close(pred_ctf, pred * ctf, rtol=0, atol=1e-6 * scale)


def test_render_rotations_and_shifts_match_projection(volume):
    gen = torch.Generator().manual_seed(3)
    rotations = torch.cat([rot_z(torch.tensor([math.pi / 2])), random_rotations(3, generator=gen)])
    shifts_px = torch.tensor([[0.0, 0.0], [1.5, -2.0], [-3.25, 0.5], [0.0, 4.0]])
    _, pred, target = _render_case(volume, rotations, shifts_px)
    scale = float(target.abs().max())
    torch.testing.assert_close(pred, target, rtol=0, atol=1e-5 * scale)
    # A wrong shift sign would not match.
    _, pred_wrong, _ = _render_case(volume, rotations, -shifts_px)
    assert float((pred_wrong - target).abs().max()) > 1e-2 * scale


def test_image_spectra_parseval():
    """Weighted squared error on the kept half equals the real-space squared error for
    images band-limited to the kept disk (CryoAI module docstring)."""
    from cryoai.physics.fft import ifft2_c

    model = CryoAI(N, PIXEL_A, nn.Identity())
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(3, N, N, generator=gen, dtype=torch.float64)
    spec = fft2_c(images)
    g = torch.arange(N) - N // 2
    r = torch.sqrt(g[:, None] ** 2 + g[None, :] ** 2)
    spec[:, r > N // 2 - 1] = 0
    images = ifft2_c(spec).real
    y = model.image_spectra(images)
    real_space = (images[0] - images[1]).pow(2).sum()
    fourier = ((y[0] - y[1]).abs() ** 2 * model.formation.hermitian_weight.double()).sum()
    np.testing.assert_allclose(float(fourier), float(real_space), rtol=1e-10)


def test_encoder_input_size_rule():
    """None = automatic (half the box, even, from 64 px up; full box below), 0 = full box."""
    from cryoai.models.encoder import encoder_input_size

    assert encoder_input_size(None, 64) == 32
    assert encoder_input_size(None, 128) == 64
    assert encoder_input_size(None, 66) == 32  # half of 66 is odd: rounded down to even
    assert encoder_input_size(None, 48) == 48
    assert encoder_input_size(0, 64) == 64
    assert encoder_input_size(40, 64) == 40
    assert encoder_input_size(80, 64) == 64


def test_config_encoder_input_default_flag_and_paper_preset():
    """The default model crops the encoder input at 64 px; the flag takes 0 (full box) as an int;
    the paper preset keeps the paper's full-box input."""
    import argparse

    from cryoai.models.cryoai import build_model
    from cryoai.training.config import TrainConfig, add_config_args, resolve_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    parser.add_argument("--config", default=None)
    add_config_args(parser)
    assert resolve_config(parser.parse_args([])).encoder_input_px is None
    full = resolve_config(parser.parse_args(["--encoder-input-px", "0"]))
    assert full.encoder_input_px == 0 and isinstance(full.encoder_input_px, int)
    assert resolve_config(parser.parse_args(["--preset", "paper"])).encoder_input_px == 0
    assert build_model(TrainConfig(), 64, 5.0).encoder.input_px == 32
    assert build_model(full, 64, 5.0).encoder.input_px == 64
    assert build_model(TrainConfig(), 32, 5.0).encoder.input_px == 32
