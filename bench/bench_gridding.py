"""How a run's maps weigh the molecule from its centre to its edge, against the true map.

Trilinear interpolation in Fourier space weighs a map in real space by about
``sinc^2(x/N) sinc^2(y/N) sinc^2(z/N)`` (the transform of the interpolation's triangle kernel)
when no padding is used: the reconstruction by insertion attenuates the map off centre, and a
map fitted so that its trilinear slices match the images (the decoder polish) is boosted there
by the inverse. This bench measures both on a set with a known map and poses: it runs
``cryoai train --poses`` (the true poses held fixed), then, for the polished map
(``volume.mrc``) and a half map (``volume_half1.mrc``), the least-squares gain against the true
map in shells of real-space radius, both low-passed to ``--band`` px, relative to the gain over
the whole box (1.0 everywhere: no radial weighting). It prints the kernel's own factor along an
axis for comparison.

Example:
  python bench/bench_gridding.py ../shared/data/aspire-70s/noise-free --outdir /tmp/bench-gridding
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryoai.cli.main import main as cli
from cryoai.io import read_volume


def low_pass(volume: np.ndarray, radius_px: float) -> np.ndarray:
    """``volume`` with every Fourier coefficient beyond ``radius_px`` (cycles per box) set to 0."""
    n = volume.shape[0]
    k = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    f = np.fft.fftn(volume)
    f[np.sqrt(kx**2 + ky**2 + kz**2) > radius_px] = 0
    return np.fft.ifftn(f).real


def radial_gain(volume: np.ndarray, truth: np.ndarray, edges: list[float]) -> list[float]:
    """The least-squares gain of ``volume`` on ``truth`` in each shell of real-space radius
    (px from the box centre), over the gain on the whole box.
    """
    n = truth.shape[0]
    g = np.indices(truth.shape) - n // 2
    r = np.sqrt((g**2).sum(0))
    whole = (volume * truth).sum() / (truth * truth).sum()
    gains = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (r >= lo) & (r < hi)
        gains.append(float((volume * truth)[sel].sum() / (truth * truth)[sel].sum() / whole))
    return gains


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="folder with particles.star (true poses) and ground_truth.mrc")
    p.add_argument("--outdir", type=Path, default=Path("bench-gridding"))
    p.add_argument("--band", type=float, default=12.0, help="low-pass of both maps, frequency px")
    p.add_argument("--step", type=float, default=4.0, help="shell width, px")
    args = p.parse_args()
    run = args.outdir / "known-poses"
    star = str(args.dataset / "particles.star")
    if cli(["train", star, "--poses", star, "--outdir", str(run), "--force", "--quiet",
            "--volume-every-minutes", "1000"]):
        raise SystemExit("train failed")
    truth = read_volume(args.dataset / "ground_truth.mrc")[0].astype(np.float64)
    n = truth.shape[0]
    edges = list(np.arange(0.0, 0.45 * n + 1e-9, args.step))
    t = low_pass(truth, args.band)
    print(f"gain against the true map by real-space radius (px; box {n}), over the whole box's gain; "
          f"both maps low-passed to {args.band:g} px")
    print(f"{'map':<22}" + "".join(f"{f'{lo:.0f}-{hi:.0f}':>8}" for lo, hi in zip(edges[:-1], edges[1:],
                                                                                    strict=True)))
    for name in ("volume.mrc", "volume_half1.mrc"):
        m = read_volume(run / name)[0].astype(np.float64)
        gains = radial_gain(low_pass(m, args.band), t, edges)
        print(f"{name:<22}" + "".join(f"{v:8.3f}" for v in gains))
    mid = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    print(f"{'sinc^2(r/N), an axis':<22}" + "".join(f"{np.sinc(r / n) ** 2:8.3f}" for r in mid))


if __name__ == "__main__":
    main()
