"""Throughput of training steps and pose prediction (images per second), compute only.

Builds the real :class:`cryoai.training.trainer.Trainer` (the run's fitting loop, as
``cryoai.pipeline.run_default`` builds it) on a tiny throw-away stack, then times
``Trainer.train_step`` on synthetic batches that are already on the device (random images,
realistic CTF parameters), so that no file or loader time is counted:

  (a) voxel decoder + encoder (encoder width 0.25, the default model: the encoder reads images
      Fourier-cropped to half the box from 64 px up; precision "auto": bf16 autocast in the
      encoder where the hardware has native bf16, else fp32)
  (f) as (a) with the encoder in fp32
  (g) as (a) with the encoder reading the full box (``encoder_input_px=0``)
  (b) FourierNet (width 256) + encoder (width 0.25)
  (c) the paper preset: FourierNet 256 + encoder width 1.0
  (d) voxel decoder with fixed poses (no encoder)
  (e) pose prediction: encoder forward + ``choose_poses`` (heads and 180-degree flip resolved
      by the loss), no gradients, on the model of (a); (h) the same on the model of (g)

Each case runs ``--warmup`` untimed steps, then ``--steps`` timed steps. The floating-point
operations of one step are counted by ``torch.utils.flop_counter`` (matrix products and
convolutions, which dominate) and the achieved rate is compared with the machine's measured
matrix-multiply rate (fp32, and bf16 for the bf16 cases), the practical peak.

Example:
  python bench/bench_throughput.py --box 64 --batch-size 32 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from cryoai.data.dataset import ParticleBatch
from cryoai.io.mrc import write_stack
from cryoai.io.particles import ParticleTable
from cryoai.models.encoder import count_parameters
from cryoai.physics.masks import circular_mask
from cryoai.physics.rotations import random_rotations
from cryoai.pipeline.run import fitting_loop
from cryoai.training.config import PRESETS, TrainConfig
from cryoai.training.poses import choose_poses
from cryoai.training.trainer import Trainer

CASES = {
    "a": ("voxel + encoder 0.25", dict(decoder="voxel", encoder_width=0.25), False),
    "f": ("voxel + encoder 0.25, fp32", dict(decoder="voxel", encoder_width=0.25, precision="fp32"), False),
    "g": ("voxel + encoder 0.25, full input", dict(decoder="voxel", encoder_width=0.25, encoder_input_px=0),
          False),
    "b": ("FourierNet 256 + encoder 0.25",
          dict(decoder="fouriernet", fouriernet_width=256, encoder_width=0.25), False),
    "c": ("paper (FourierNet 256 + encoder 1.0)", dict(PRESETS["paper"]), False),
    "d": ("voxel, fixed poses", dict(decoder="voxel"), True),
}


def make_table(workdir: Path, box: int, n: int, pixel_size_a: float, gen: torch.Generator
               ) -> ParticleTable:
    """A particle table over a small random stack (the Trainer reads it once at start-up)."""
    images = torch.randn(n, box, box, generator=gen).numpy().astype(np.float32)
    stack = workdir / "bench.mrcs"
    write_stack(stack, images, pixel_size_a)
    ctf = ctf_params(n, gen)
    return ParticleTable(
        stack_files=(str(stack),), stack_ids=np.zeros(n, dtype=np.int32),
        stack_indices=np.arange(n, dtype=np.int32), box_px=box,
        pixel_size_a=np.full(n, pixel_size_a),
        **{k: v.double().numpy() for k, v in ctf.items()},
        rotations=random_rotations(n, generator=gen, dtype=torch.float64).numpy(),
        shifts_a=np.zeros((n, 2)), source_path=str(workdir / "bench.star"))


def ctf_params(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Typical single-particle CTF parameters: 1-2.5 um underfocus, some astigmatism, 300 kV."""
    du = 10000 + 15000 * torch.rand(n, generator=gen)
    return {
        "defocus_u_a": du,
        "defocus_v_a": du - 500 * torch.rand(n, generator=gen),
        "defocus_angle_rad": torch.pi * torch.rand(n, generator=gen),
        "voltage_kv": torch.full((n,), 300.0),
        "cs_mm": torch.full((n,), 2.7),
        "amplitude_contrast": torch.full((n,), 0.1),
        "phase_shift_rad": torch.zeros(n),
        "bfactor_a2": torch.zeros(n),
    }


def make_batch(n: int, box: int, pixel_size_a: float, gen: torch.Generator, device) -> ParticleBatch:
    batch = ParticleBatch(images=torch.randn(n, box, box, generator=gen),
                          index=torch.arange(n, dtype=torch.int64),
                          pixel_size_a=torch.full((n,), pixel_size_a), **ctf_params(n, gen))
    return batch.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def build_trainer(values: dict, fixed: bool, table: ParticleTable, workdir: Path,
                  device: torch.device, batch_size: int) -> Trainer:
    names = {f.name for f in fields(TrainConfig)}
    values = {**values, "batch_size": batch_size, "tensorboard": False, "normalize_samples": 64}
    if "ab_initio" in names and not fixed:
        values["ab_initio"] = "encoder"  # the amortized (encoder) training step
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in names})
    return fitting_loop(table, cfg, workdir / "run", device=device, poses=table.poses() if fixed else None)


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matrix product in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sec = timed(lambda: a @ b, device, 2, reps)
    return 2 * n**3 / sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64, help="image size (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--predict-batch-size", type=int, default=256,
                   help="pose-prediction batch (default 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help=f"torch CPU threads (default: all cores, {os.cpu_count()})")
    p.add_argument("--pixel-size", type=float, default=3.0, help="Angstrom per pixel (default 3)")
    p.add_argument("--cases", default="afgbcdeh",
                   help="which cases to run, letters a-h (default afgbcdeh)")
    args = p.parse_args()

    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); box {args.box}; torch {torch.__version__}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="cryoai-bench-") as tmp:
        workdir = Path(tmp)
        n_table = max(args.batch_size, 64)
        table = make_table(workdir, args.box, n_table, args.pixel_size, gen)
        batch = make_batch(args.batch_size, args.box, args.pixel_size, gen, device)
        peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
        print(f"matrix-multiply peak (2048^3): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
        trainers = {}
        for key, (label, values, fixed) in CASES.items():
            needed = (key in args.cases or (key == "a" and "e" in args.cases)
                      or (key == "g" and "h" in args.cases))
            if not needed:
                continue
            tr = build_trainer(values, fixed, table, workdir, device, args.batch_size)
            trainers[key] = tr
            if key not in args.cases:
                continue
            sec = timed(lambda tr=tr: tr.train_step(batch), device, args.warmup, args.steps)
            flops = count_flops(lambda tr=tr: tr.train_step(batch))
            bf16 = tr.model.encoder is not None and tr.model.encoder.bf16
            rows.append((f"({key}) {label}", "train step", args.batch_size, sec,
                         count_parameters(tr.model), flops, "bf16" if bf16 else "fp32"))
            print(f"  done ({key})", flush=True)
        for key, src in (("e", "a"), ("h", "g")):
            if key not in args.cases:
                continue
            tr = trainers[src]
            model = tr.model.eval()
            pbatch = make_batch(args.predict_batch_size, args.box, args.pixel_size, gen, device)
            mask = tr.mask if tr.mask is not None else circular_mask(
                args.box, 0.45 * args.box, soft_edge_px=3, device=device)

            def predict(model=model, mask=mask, pbatch=pbatch):
                with torch.no_grad():
                    choose_poses(model, pbatch, mask)

            sec = timed(predict, device, args.warmup, args.steps)
            flops = count_flops(predict)
            label = f"encoder 0.25, {model.encoder.input_px} px input"
            rows.append((f"({key}) pose prediction ({label})", "choose_poses", args.predict_batch_size, sec,
                         count_parameters(model.encoder), flops, "bf16" if model.encoder.bf16 else "fp32"))

    print()
    print(f"{'case':<50} {'kind':<12} {'batch':>5} {'ms/step':>9} {'images/s':>9} {'params':>10} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>7}")
    print("-" * 128)
    for label, kind, b, sec, n_params, flops, prec in rows:
        rate = flops / sec
        print(f"{label:<50} {kind:<12} {b:>5} {sec * 1e3:>9.1f} {b / sec:>9.1f} {n_params:>10,} "
              f"{flops / 1e9:>10.2f} {rate / 1e9:>8.1f} {100 * rate / peak[prec]:>6.0f}% ({prec})")


if __name__ == "__main__":
    main()
