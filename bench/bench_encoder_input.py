"""How much pose information the encoder loses when its input is Fourier-cropped.

Trains the pose encoder alone, supervised, to regress the true rotation of simulated particle
images (fresh images every step: projections of a map at uniform random rotations, shifted,
multiplied by a CTF, with white noise at a given SNR, masked as ``cryoai train`` masks them), once
per encoder input size, with the same seed, images and number of steps. Prints the median
rotation error on a fixed held-out set as training goes, and the encoder's forward speed.

This isolates the question "does a cropped input hold the pose information the encoder can
use?" from the (slow, seed-dependent) convergence of unsupervised training: supervised
regression is an upper bound on what the encoder can learn from its input.

Example:
  python bench/bench_encoder_input.py --sizes 64 32 --images 200000 --snr-db none
  python bench/bench_encoder_input.py --sizes 64 32 --images 200000 --snr-db -10
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from cryoai.assets import embedded_map_path
from cryoai.io import read_volume
from cryoai.models.cryoai import use_bf16
from cryoai.models.encoder import PoseEncoder
from cryoai.physics.ctf import compute_ctf
from cryoai.physics.fft import crop_center_2d, fft2_c, fft3_c, ifft2_c, pad_volume
from cryoai.physics.grids import frequency_grid_2d
from cryoai.physics.masks import circular_mask
from cryoai.physics.projection import extract_central_slices
from cryoai.physics.rotations import frobenius_distance_sq, frobenius_sq_to_angle, random_rotations
from cryoai.physics.shifts import phase_shift


class ImageSource:
    """Simulated images of one map: random poses, shifts N(0, shift_sigma_px), CTF, noise."""

    def __init__(self, volume: np.ndarray, pixel_size_a: float, snr_db: float | None,
                 shift_sigma_px: float, seed: int, oversample: int = 1, device=None):
        self.n = volume.shape[-1]
        self.pixel_size_a = pixel_size_a
        self.device = torch.device(device or "cpu")
        self.fvol = fft3_c(pad_volume(torch.as_tensor(volume, dtype=torch.float32, device=self.device),
                                      oversample * self.n))
        self.freqs_a = frequency_grid_2d(self.n, pixel_size_a, device=self.device)
        self.shift_sigma_a = shift_sigma_px * pixel_size_a
        self.gen = torch.Generator().manual_seed(seed)
        self.mask = circular_mask(self.n, 0.45 * self.n, soft_edge_px=3, device=self.device)
        self.noise_std = 0.0
        if snr_db is not None:
            clean, _ = self.draw(512, noise=False)
            self.noise_std = float(clean.var()) ** 0.5 / 10 ** (snr_db / 20)

    def draw(self, count: int, noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked images (count, N, N) and their true rotations (count, 3, 3)."""
        g, dev = self.gen, self.device  # random numbers drawn on the CPU: same on any device
        rot = random_rotations(count, generator=g).to(dev)
        proj = crop_center_2d(ifft2_c(extract_central_slices(self.fvol, rot)).real, self.n)
        mean_def = (15000.0 * torch.exp(0.3 * torch.randn(count, generator=g))).to(dev)
        ctf = compute_ctf(self.freqs_a, mean_def, mean_def, torch.zeros(count, device=dev), 300.0, 2.7, 0.1,
                          0.0, 0.0)
        shifts = (torch.randn(count, 2, generator=g) * self.shift_sigma_a).to(dev)
        images = ifft2_c(fft2_c(proj) * ctf * phase_shift(self.freqs_a, shifts)).real
        if noise and self.noise_std > 0:
            images = images + self.noise_std * torch.randn(images.shape, generator=g).to(dev)
        return images / (images.std() + 1e-12) * self.mask, rot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_error_deg(encoder: PoseEncoder, images: torch.Tensor, rotations: torch.Tensor) -> float:
    encoder.eval()
    with torch.no_grad():
        pred = torch.cat([encoder(images[i:i + 256])[0][:, 0] for i in range(0, len(images), 256)])
    encoder.train()
    return float(torch.rad2deg(frobenius_sq_to_angle(frobenius_distance_sq(pred, rotations))).median())


def forward_rate(encoder: PoseEncoder, images: torch.Tensor, reps: int = 5) -> float:
    """Images per second of the encoder's forward pass in inference (batch of ``images``)."""
    encoder.eval()
    with torch.no_grad():
        encoder(images)
        _sync(images.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            encoder(images)
        _sync(images.device)
        sec = (time.perf_counter() - t0) / reps
    encoder.train()
    return len(images) / sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", default=None, help="map to project (default: the embedded 70S, 5 A/px)")
    p.add_argument("--pixel-size", type=float, default=None, help="A/px (default: the map's header)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 32],
                   help="encoder input sizes to compare (the map's box = no crop)")
    p.add_argument("--images", type=int, default=200_000, help="training images per size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--width", type=float, default=0.25, help="encoder width (the default model: 0.25)")
    p.add_argument("--snr-db", default="-10", help="SNR in dB, or 'none' for noise-free")
    p.add_argument("--shift-sigma-px", type=float, default=2.0)
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=25_000, help="images between evaluations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oversample", type=int, default=1,
                   help="zero-padding factor of the projector (2: more exact, about 8x slower)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = p.parse_args()

    torch.set_num_threads(max(1, args.threads))
    path = args.map or embedded_map_path()
    volume, voxel_a = read_volume(path)
    pixel_size_a = args.pixel_size or voxel_a
    snr_db = None if args.snr_db.lower() == "none" else float(args.snr_db)
    n = volume.shape[-1]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = use_bf16("auto", device)
    print(f"map {path} ({n} px, {pixel_size_a} A/px); SNR {args.snr_db} dB; {args.images:,} images of "
          f"batch {args.batch_size}, lr {args.lr}; encoder width {args.width}, "
          f"{'bf16' if bf16 else 'fp32'}; {device}, {torch.get_num_threads()} CPU threads", flush=True)
    held_out = ImageSource(volume, pixel_size_a, snr_db, args.shift_sigma_px,
                           seed=10_000 + args.seed, oversample=args.oversample, device=device)
    eval_images, eval_rot = held_out.draw(args.eval_images)
    results = {}
    for size in args.sizes:
        torch.manual_seed(args.seed)
        source = ImageSource(volume, pixel_size_a, snr_db, args.shift_sigma_px, seed=args.seed,
                             oversample=args.oversample, device=device)
        encoder = PoseEncoder(n, width=args.width, input_px=size, bf16=bf16).to(device)
        opt = torch.optim.Adam(encoder.parameters(), lr=args.lr, amsgrad=True)
        curve = []
        seen, next_eval, train_sec = 0, args.eval_every, 0.0
        steps = math.ceil(args.images / args.batch_size)
        for _ in range(steps):
            images, rot = source.draw(args.batch_size)
            t0 = time.perf_counter()
            pred, _ = encoder(images)
            loss = frobenius_distance_sq(pred[:, 0], rot).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            opt.step()
            _sync(device)
            train_sec += time.perf_counter() - t0
            seen += args.batch_size
            if seen >= next_eval or seen >= args.images:
                err = median_error_deg(encoder, eval_images, eval_rot)
                curve.append((seen, err))
                print(f"  input {size:>3} px: {seen:>8,} images, median error {err:6.1f} deg "
                      f"({train_sec / 60:.1f} min of training steps)", flush=True)
                next_eval += args.eval_every
        rate = forward_rate(encoder, eval_images[:256])
        results[size] = (curve, train_sec, rate)

    print()
    print(f"{'input px':>8} {'final median error (deg)':>25} {'training min':>13} {'forward images/s':>17}")
    for size, (curve, train_sec, rate) in results.items():
        print(f"{size:>8} {curve[-1][1]:>25.1f} {train_sec / 60:>13.1f} {rate:>17.0f}")


if __name__ == "__main__":
    main()
