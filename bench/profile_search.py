"""Where the pose search's time goes: per stage and per function, wall time and minor page
faults (which do not depend on the CPU model), and the arithmetic rate of its matrix products
against this machine's matmul peak, measured in the same run.

Runs the search's mechanisms from a blob (``search_subset``, ``repose_subset`` and
``assign_remaining`` of ``cryoai.reconstruction``, with the settings of ``cryoai train``) on a
particle set, timing every call of the hot functions (inclusive times: a function
called inside another is counted in both). Matrix-product FLOPs are counted as they happen
(``2 M N K`` per real product) by a torch function mode.

Example:
  python bench/profile_search.py ../shared/data/aspire-70s/snr0.1 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import cryoai.reconstruction.em as em
import cryoai.reconstruction.pose_search as pose_search
import cryoai.reconstruction.regularised as regularised
from cryoai.data.dataset import ParticleDataset, estimate_scale
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.pipeline.settings import assignment_settings, search_settings
from cryoai.reconstruction import (
    ParticleSpectra,
    PoseAssigner,
    assign_remaining,
    repose_subset,
    search_subset,
)
from cryoai.training.config import TrainConfig

_PRODUCTS = {torch.matmul, torch.mm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm,
             torch.addmm, torch.Tensor.addmm, torch.Tensor.addmm_, torch.bmm, torch.Tensor.bmm,
             torch.baddbmm, torch.Tensor.baddbmm_}


class FlopCounter(TorchFunctionMode):
    """Counts the FLOPs of real matrix products (complex ones count 4 real products)."""

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _PRODUCTS:
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if len(mats) >= 2:
                a, b = mats[-2], mats[-1]
                batch = a.shape[:-2].numel() if a.dim() > 2 else 1
                factor = 4 if a.is_complex() else 1
                self.flops += factor * 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return out


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


STATS: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # calls, seconds, faults


def timed(module, name: str, label: str | None = None) -> None:
    """Wrap ``module.name`` to accumulate its calls, wall time and minor faults."""
    fn = getattr(module, name)
    label = label or f"{module.__name__.split('.')[-1]}.{name}"

    def wrapper(*args, **kwargs):
        t0, f0 = time.perf_counter(), minor_faults()
        try:
            return fn(*args, **kwargs)
        finally:
            s = STATS[label]
            s[0] += 1
            s[1] += time.perf_counter() - t0
            s[2] += minor_faults() - f0

    setattr(module, name, wrapper)


def matmul_peak_gflops(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="folder with particles.star")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None, help="search subset (default: cryoai train's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    cfg = TrainConfig(seed=args.seed)
    if args.subset:
        cfg.search_subset = args.subset
    table = load_particles(args.dataset / "particles.star", read_poses=False)
    scale = estimate_scale(table, cfg.normalize_samples, cfg.seed)
    dataset = ParticleDataset(table, scale=scale)
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    particles = ParticleSpectra(dataset, formation, torch.device("cpu"))
    for name in ("iterate", "initialise"):
        timed(em.ExpectationMaximisation, name, f"EM.{name}")
    timed(pose_search, "assign_global")
    timed(pose_search, "refine_local")
    timed(pose_search._Search, "_hard_backprojection", "search.hard_backprojection")
    timed(em, "score_grid")
    timed(em, "sample_volume", "em.sample_volume (slices)")
    timed(em, "insert_slices", "em.insert_slices (M step)")
    timed(regularised, "regularised_solve")
    timed(ParticleSpectra, "read", "spectra.read (disk + FFT)")
    f0, t0 = minor_faults(), time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with FlopCounter() as counter:
        found = search_subset(particles, search_settings(cfg, table.box_px), log=print)
        assigner = PoseAssigner(formation, found.fourier_volume, assignment_settings(cfg, table.box_px))
        assign_remaining(particles, repose_subset(found, assigner), assigner, log=print)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nsearch: {wall:.1f} s wall, user {r1.ru_utime - r0.ru_utime:.1f} s, "
          f"sys {r1.ru_stime - r0.ru_stime:.1f} s, {minor_faults() - f0:,} minor page faults, "
          f"{len(table)} particles (subset {min(cfg.search_subset, len(table))}), "
          f"{torch.get_num_threads()} threads")
    rate = counter.flops / wall / 1e9
    print(f"matrix products: {counter.flops / 1e9:.0f} GFLOP, {rate:.1f} GFLOP/s over the search's wall "
          f"time = {100 * rate / peak:.0f}% of the fp32 matmul peak ({peak:.0f} GFLOP/s, 2048^3)")
    print(f"\n{'function (inclusive)':<34} {'calls':>6} {'seconds':>9} {'% wall':>7} {'minor faults':>13}")
    for label, (calls, sec, faults) in sorted(STATS.items(), key=lambda kv: -kv[1][1]):
        print(f"{label:<34} {calls:>6} {sec:>9.1f} {100 * sec / wall:>6.0f}% {faults:>13,}")


if __name__ == "__main__":
    main()
