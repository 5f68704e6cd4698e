"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_figure(fig, path: str | Path, dpi: int | None = None) -> None:
    """Save a matplotlib figure as PNG atomically (temporary file, then rename)."""
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fsc(curve: np.ndarray, box_px: int, pixel_size_a: float, path: str | Path,
             title: str = "Fourier shell correlation") -> None:
    """FSC against spatial frequency (1/A), with the 0.5 and 0.143 thresholds."""
    plt = _pyplot()
    freq = np.arange(len(curve)) / (box_px * pixel_size_a)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(freq, curve, lw=2)
    for t, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(t, color="grey", ls=style, lw=1, label=f"FSC = {t}")
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    secax = ax.secondary_xaxis("top", functions=(lambda f: f, lambda f: f))
    ticks = [f for f in ax.get_xticks() if 0 < f <= freq[-1]]
    secax.set_xticks(ticks)
    secax.set_xticklabels([f"{1 / f:.0f}" for f in ticks])
    secax.set_xlabel("resolution (A)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_rotation_errors(errors_deg: np.ndarray, path: str | Path) -> None:
    """Histogram of per-particle rotation errors (degrees)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.hist(errors_deg, bins=np.linspace(0, 180, 61))
    ax.axvline(np.median(errors_deg), color="k", ls="--", label=f"median {np.median(errors_deg):.1f} deg")
    ax.set_xlabel("rotation error (degrees)")
    ax.set_ylabel("particles")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_map_slices(volume: np.ndarray, path: str | Path, title: str = "") -> None:
    """Central slices (z, y, x) and projections along each axis of a volume."""
    plt = _pyplot()
    n = volume.shape[0]
    c = n // 2
    panels = [volume[c], volume[:, c], volume[:, :, c], volume.sum(0), volume.sum(1), volume.sum(2)]
    names = ["slice z", "slice y", "slice x", "proj z", "proj y", "proj x"]
    fig, axes = plt.subplots(2, 3, figsize=(7, 4.8), dpi=110)
    for ax, img, name in zip(axes.ravel(), panels, names, strict=True):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
