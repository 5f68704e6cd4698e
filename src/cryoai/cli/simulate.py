"""Simulate a particle data set from a map or an atomic model.

Writes OUTDIR/particles.star (RELION 3.1 with the true poses, shifts and CTF), the .mrcs
stacks it references and OUTDIR/ground_truth.mrc. Rotations are uniform on SO(3), shifts
Gaussian, defocus log-normal with astigmatism, white Gaussian noise at the requested SNR
(variance of the noise-free images over the variance of the noise). Streams in chunks, so
memory stays bounded for millions of particles; the same seed gives the same files.

Example: cryoai simulate --map map.mrc --n 10000 --snr-db -10 --outdir sim/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .common import pick_device, prepare_outdir, progress_bar


def add_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--map",
                     help="input map (.mrc); default: the embedded 70S ribosome (64 px, 5 A)")
    src.add_argument("--model",
                     help="atomic model (.pdb/.cif) turned into a potential map with gemmi")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="pixel size in A (required with --model; overrides the map header)")
    parser.add_argument("--box", type=int, default=None,
                        help="box in px (with --model; with --map, Fourier-crop the map to "
                             "this box)")
    parser.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    parser.add_argument("--snr-db", type=float, default=-10.0, help="SNR in dB (default -10)")
    parser.add_argument("--no-noise", action="store_true", help="write noise-free images")
    parser.add_argument("--shift-sigma-a", type=float, default=0.0,
                        help="standard deviation of the shifts per axis, A (default 0)")
    parser.add_argument("--defocus-a", type=float, default=15000.0,
                        help="median defocus, A (default 15000)")
    parser.add_argument("--defocus-log-sigma", type=float, default=0.3,
                        help="sigma of log(defocus) (default 0.3)")
    parser.add_argument("--astigmatism-a", type=float, default=300.0,
                        help="typical dU - dV, A (default 300)")
    parser.add_argument("--voltage-kv", type=float, default=300.0)
    parser.add_argument("--cs-mm", type=float, default=2.7)
    parser.add_argument("--amplitude-contrast", type=float, default=0.1)
    parser.add_argument("--bfactor", type=float, default=0.0, help="CTF envelope B-factor, A^2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=512, help="images rendered at once")
    parser.add_argument("--stack-size", type=int, default=100_000, help="images per .mrcs file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--outdir", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="overwrite a previous simulation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_input_volume(args) -> tuple[np.ndarray, float]:
    """The map to simulate from and its voxel size (A), honouring --map/--model/--box."""
    from ..assets import embedded_map_path
    from ..io.mrc import read_volume
    from ..simulate import atomic_model_to_map

    if args.model:
        if args.pixel_size is None or args.box is None:
            raise InputError("--model needs --pixel-size and --box")
        volume = atomic_model_to_map(args.model, pixel_size_a=args.pixel_size, box_px=args.box)
        return volume, args.pixel_size
    path = args.map or embedded_map_path()
    volume, voxel_size_a = read_volume(path)
    if args.pixel_size is not None:
        voxel_size_a = args.pixel_size
    if not voxel_size_a or voxel_size_a <= 0:
        raise InputError(f"{path}: the header has no voxel size; give --pixel-size")
    n = volume.shape[-1]
    if volume.shape != (n, n, n):
        raise InputError(f"{path}: the map is {volume.shape}, not a cube")
    if n % 2:
        raise InputError(f"{path}: box size {n} is odd; cryoai needs even boxes")
    if args.box is not None and args.box != n:
        import torch

        from ..physics.fft import fourier_crop_3d

        if args.box > n or args.box % 2:
            raise InputError(f"--box {args.box}: must be even and at most the map's box ({n})")
        cropped = fourier_crop_3d(torch.as_tensor(volume, dtype=torch.float64), args.box)
        volume = cropped.float().numpy()
        voxel_size_a = voxel_size_a * n / args.box
    return volume, voxel_size_a


def check_args(args) -> None:
    """Refuse option values the simulator cannot use (InputError, one line)."""
    for name, value in (("--n", args.n), ("--chunk-size", args.chunk_size),
                        ("--stack-size", args.stack_size)):
        if value < 1:
            raise InputError(f"{name} must be at least 1 (got {value})")
    finite = {"--snr-db": args.snr_db, "--shift-sigma-a": args.shift_sigma_a,
              "--defocus-a": args.defocus_a, "--defocus-log-sigma": args.defocus_log_sigma,
              "--astigmatism-a": args.astigmatism_a, "--voltage-kv": args.voltage_kv,
              "--cs-mm": args.cs_mm, "--amplitude-contrast": args.amplitude_contrast,
              "--bfactor": args.bfactor}
    for name, value in finite.items():
        if not np.isfinite(value):
            raise InputError(f"{name} must be a finite number (got {value})")
    for name in ("--shift-sigma-a", "--defocus-log-sigma", "--astigmatism-a", "--cs-mm"):
        if finite[name] < 0:
            raise InputError(f"{name} must not be negative (got {finite[name]})")
    for name in ("--defocus-a", "--voltage-kv"):
        if finite[name] <= 0:
            raise InputError(f"{name} must be positive (got {finite[name]})")
    if not 0 <= args.amplitude_contrast < 1:
        raise InputError(f"--amplitude-contrast must be in [0, 1) (got {args.amplitude_contrast})")
    if args.pixel_size is not None and not (np.isfinite(args.pixel_size) and args.pixel_size > 0):
        raise InputError(f"--pixel-size must be a positive number (got {args.pixel_size})")


def main(args) -> int:
    from ..io import write_json_atomic
    from ..simulate import SimulationConfig, simulate_dataset

    check_args(args)
    volume, pixel_size_a = load_input_volume(args)
    if not args.no_noise and float(np.ptp(volume)) == 0.0:
        raise InputError(f"{args.map or args.model or 'map'}: the map is constant, so its "
                         "projections have no signal to set an SNR against (use --no-noise)")
    outdir = prepare_outdir(args.outdir, marker="particles.star", force=args.force,
                            resumable=False)
    cfg = SimulationConfig(
        n_particles=args.n, seed=args.seed, snr_db=None if args.no_noise else args.snr_db,
        shift_sigma_a=args.shift_sigma_a, defocus_median_a=args.defocus_a,
        defocus_log_sigma=args.defocus_log_sigma, astigmatism_sigma_a=args.astigmatism_a,
        voltage_kv=args.voltage_kv, cs_mm=args.cs_mm, amplitude_contrast=args.amplitude_contrast,
        bfactor_a2=args.bfactor, chunk_size=args.chunk_size, stack_size=args.stack_size,
    )
    bar = progress_bar(args.n, "simulate", disable=args.quiet)
    try:
        report = simulate_dataset(volume, pixel_size_a, outdir, cfg,
                                  device=pick_device(args.device), progress=bar.update)
    finally:
        bar.close()
    report.update({"box_px": int(volume.shape[-1]), "pixel_size_a": pixel_size_a,
                   "config": cfg.__dict__,
                   "source": args.model or args.map or "embedded 70S ribosome"})
    write_json_atomic(Path(outdir) / "simulation.json", report)
    snr = "no noise" if cfg.snr_db is None else f"SNR {report['snr_db_measured']:.2f} dB measured"
    print(f"wrote {args.n} particles ({volume.shape[-1]} px, {pixel_size_a:.3f} A, {snr}) "
          f"to {report['star_path']}")
    return 0
