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


def _error_histogram(errors: np.ndarray, bins, xlabel: str, median_label: str, path: str | Path) -> None:
    """Histogram of per-particle errors with the median marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.hist(errors, bins=bins)
    ax.axvline(np.median(errors), color="k", ls="--", label=median_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _zoomed(errors: np.ndarray, floor: float, ceiling: float | None = None) -> tuple[np.ndarray, float]:
    """Errors clipped to a range that shows the bulk (1.2 x the 99th percentile, at least
    ``floor``, at most ``ceiling``): larger values land in the last bin.
    """
    errors = np.asarray(errors, dtype=float)
    hi = max(floor, 1.2 * float(np.percentile(errors, 99)))
    if ceiling is not None:
        hi = min(hi, ceiling)
    return np.minimum(errors, hi), hi


def plot_rotation_errors(errors_deg: np.ndarray, path: str | Path) -> None:
    """Histogram of per-particle rotation errors (degrees); errors beyond the plotted range are
    counted in the last bin.
    """
    clipped, hi = _zoomed(errors_deg, 5.0, 180.0)
    _error_histogram(clipped, np.linspace(0, hi, 61), f"rotation error (degrees; last bin: >= {hi:.3g})",
                     f"median {np.median(errors_deg):.2f} deg", path)


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


def plot_training_curves(loss_steps: np.ndarray, losses: np.ndarray, path: str | Path,
                         resolution_minutes: np.ndarray | None = None,
                         resolution_px: np.ndarray | None = None, pixel_size_a: float | None = None) -> None:
    """The training loss against the step and, when logged, the FSC=0.5 resolution against the
    ground truth over the run's minutes.
    """
    plt = _pyplot()
    two = resolution_px is not None and len(resolution_px) > 0
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(9 if two else 5, 3.5), dpi=110, squeeze=False)
    ax = axes[0, 0]
    if len(losses):
        ax.plot(loss_steps, losses, lw=1.5)
        if np.all(np.asarray(losses) > 0):
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if two:
        ax = axes[0, 1]
        res = np.asarray(resolution_px, dtype=float)
        ax.plot(resolution_minutes, res if pixel_size_a is None else res * pixel_size_a, "o-", lw=1.5)
        ax.set_xlabel("minutes")
        ax.set_ylabel("FSC=0.5 resolution (" + ("px" if pixel_size_a is None else "A") + ")")
        ax.set_title("resolution against the reference")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def fsc_crossing(curve: np.ndarray, threshold: float) -> float | None:
    """The shell (fractional, linearly interpolated) where an FSC curve first falls below
    ``threshold``; None if it never does.
    """
    c = np.asarray(curve, dtype=float)
    below = np.flatnonzero(c[1:] < threshold)
    if not len(below):
        return None
    s = int(below[0]) + 1
    c0, c1 = c[s - 1], c[s]
    return (s - 1) + ((c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0)


def plot_fsc_curves(curves: dict[str, np.ndarray], box_px: int, pixel_size_a: float,
                    path: str | Path, thresholds: dict[str, float] | None = None) -> None:
    """Several FSC curves (label -> (N//2+1,) values) against spatial frequency, with the
    resolution in Angstrom on the top axis, the 0.5 and 0.143 lines, and each curve's crossing of
    its threshold (``thresholds``: label -> 0.5 or 0.143) marked with its resolution in A.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    extent_a = box_px * pixel_size_a
    for label, curve in curves.items():
        freq = np.arange(len(curve)) / extent_a
        (line,) = ax.plot(freq, curve, lw=2, label=label)
        t = (thresholds or {}).get(label)
        shell = None if t is None else fsc_crossing(curve, t)
        if shell is not None and shell > 0:
            f = shell / extent_a
            ax.axvline(f, color=line.get_color(), ls=":", lw=1)
            ax.annotate(f"{1 / f:.1f} A at {t:g}", (f, t), textcoords="offset points", xytext=(4, 6),
                        fontsize=8, color=line.get_color())
    for t, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(t, color="grey", ls=style, lw=1)
    nyquist = 1 / (2 * pixel_size_a)
    ax.set_xlim(0, nyquist)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    top = ax.twiny()  # the same axis, labelled in resolution
    top.set_xlim(ax.get_xlim())
    nice = [a for a in (100, 50, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4, 3.5, 3, 2.5, 2)
            if 1 / a <= nyquist and a >= 2 * pixel_size_a]
    top.set_xticks([1 / a for a in nice])
    top.set_xticklabels([f"{a:g}" for a in nice], fontsize=8)
    top.set_xlabel("resolution (A)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_search_convergence(attempts: list[dict], path: str | Path) -> None:
    """The search's convergence, per EM iteration of each attempt: the images' mean maximum
    posterior (how sharply they pick a pose) and the band (frequency px) it was scored in.

    ``attempts`` : dicts with ``attempt``, ``start``, ``em_posterior``, ``em_band_px`` and
    ``explained_signal`` (train_log.jsonl's ``search`` records).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=110)
    band_ax = ax.twinx()
    for r in attempts:
        post = np.asarray(r.get("em_posterior") or [], dtype=float)
        if not len(post):
            continue
        explained = r.get("explained_signal")
        said = f", explains {explained:.0%}" if isinstance(explained, (int, float)) else ""
        (line,) = ax.plot(np.arange(1, len(post) + 1), post, lw=2,
                          label=f"attempt {r.get('attempt')} ({r.get('start')}{said})")
        band = np.asarray(r.get("em_band_px") or [], dtype=float)
        band_ax.plot(np.arange(1, len(band) + 1), band, lw=1, ls="--", color=line.get_color())
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean maximum posterior")
    ax.set_ylim(0, 1.02)
    band_ax.set_ylabel("band (frequency px, dashed)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_stage_times(seconds: dict[str, float], path: str | Path) -> None:
    """Where the run's time went: one bar per stage (seconds)."""
    plt = _pyplot()
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(names) + 0.9), dpi=110)
    ax.barh(names[::-1], [seconds[n] for n in names[::-1]], color="#4a7ab5")
    for i, n in enumerate(names[::-1]):
        ax.text(seconds[n], i, f" {seconds[n]:.0f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(seconds.values()) * 1.2 if seconds else 1)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def viewing_directions(rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth and elevation (radians) of the projection direction ``R @ e_z`` of each pose.

    For RELION angles this azimuth is rlnAngleRot and the elevation is 90 deg - rlnAngleTilt.
    """
    d = np.asarray(rotations)[:, :, 2]
    azimuth = np.arctan2(d[:, 1], d[:, 0])
    elevation = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    return azimuth, elevation


def plot_viewing_directions(rotations: np.ndarray, path: str | Path,
                            title: str = "viewing directions") -> None:
    """A sky map (Mollweide) of the particles' viewing directions, as a 2D histogram of counts
    per equal-area cell.
    """
    plt = _pyplot()
    az, el = viewing_directions(rotations)
    # Equal-area cells, uniform in azimuth and in sin(elevation), about 5 particles per cell
    # for a uniform distribution (at most 72 x 36 cells).
    n_el = int(np.clip(np.sqrt(len(az) / 10.0), 4, 36))
    n_az = 2 * n_el
    az_edges = np.linspace(-np.pi, np.pi, n_az + 1)
    el_edges = np.arcsin(np.linspace(-1, 1, n_el + 1))
    counts, _, _ = np.histogram2d(az, el, bins=[az_edges, el_edges])
    fig = plt.figure(figsize=(7, 3.8), dpi=110)
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(az_edges, el_edges, counts.T, cmap="viridis", shading="flat")
    ax.grid(True, alpha=0.3)
    ax.set_xticklabels([])
    fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.06, label="particles per cell")
    ax.set_title(f"{title} ({len(az)} particles)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_shift_errors(errors_a: np.ndarray, path: str | Path) -> None:
    """Histogram of per-particle shift errors (Angstrom)."""
    clipped, hi = _zoomed(errors_a, 1.0)
    _error_histogram(clipped, np.linspace(0, hi, 61), f"shift error (A; last bin: >= {hi:.3g})",
                     f"median {np.median(errors_a):.2f} A", path)


def plot_particle_scores(score: np.ndarray, kept: np.ndarray, path: str | Path) -> None:
    """Histograms of the particles' scores (matched-filter SNR against the map at their pose),
    kept particles and junk apart.
    """
    plt = _pyplot()
    lo, hi = np.percentile(score, [0.5, 99.5])
    bins = np.linspace(min(lo, 0.0), hi if hi > lo else lo + 1, 61)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.hist(np.clip(score[kept], bins[0], bins[-1]), bins=bins, alpha=0.7, label=f"kept ({int(kept.sum())})")
    if (~kept).any():
        ax.hist(np.clip(score[~kept], bins[0], bins[-1]), bins=bins, alpha=0.7, color="tab:red",
                label=f"junk ({int((~kept).sum())})")
    ax.set_xlabel("score (matched-filter SNR, noise sd)")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_class_averages(images: np.ndarray, sizes: list[int] | None, path: str | Path,
                        columns: int = 10) -> None:
    """A gallery of 2D class averages (K, N, N), each titled with its number of images."""
    plt = _pyplot()
    k = len(images)
    rows = max(1, -(-k // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows), dpi=110, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            ax.imshow(images[i], cmap="gray")
            if sizes is not None and i < len(sizes):
                ax.set_title(str(sizes[i]), fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


#: The isosurface thumbnails' views: (elevation, azimuth) in degrees of matplotlib's 3D camera, and
#: the map axis each looks down (the map is stored [z, y, x]).
ISOSURFACE_VIEWS = ((90.0, -90.0, "down z"), (0.0, -90.0, "down y"), (0.0, 0.0, "down x"))


def plot_isosurface_views(volume: np.ndarray, level: float, path: str | Path, title: str = "",
                          voxel_a: float = 1.0) -> None:
    """Three static views of the isosurface of ``volume`` at ``level`` (for print and for pages
    without WebGL): a triangulated surface (scikit-image's marching cubes), shaded by its normals
    under one light, seen down z, y and x.

    Parameters
    ----------
    volume : (N, N, N) map, [z, y, x] as MRC stores it (already cropped/low-passed as shown).
    level : the isosurface's value.
    path : PNG file to write.
    title : the figure's title.
    voxel_a : Angstrom per voxel of ``volume`` (the axes' scale).
    """
    from matplotlib.colors import LightSource
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes

    plt = _pyplot()
    volume = np.asarray(volume, dtype=np.float32)
    fig = plt.figure(figsize=(9, 3.4), dpi=110)
    inside = volume.max() > level > volume.min()
    if inside:
        # Vertices come in index order (z, y, x); drawn as (x, y, z) in Angstrom.
        verts, faces, _, _ = marching_cubes(volume, level=level, spacing=(voxel_a,) * 3)
        xyz = verts[:, ::-1]
        tris = xyz[faces]
        normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        light = LightSource(azdeg=315, altdeg=45)
        base = np.array([0.78, 0.64, 0.29])  # the 3D view's gold
        centre = (xyz.min(0) + xyz.max(0)) / 2  # the surface fills each panel
        half = 0.5 * float((xyz.max(0) - xyz.min(0)).max()) * 1.05
    else:
        centre, half = np.full(3, volume.shape[0] * voxel_a / 2), volume.shape[0] * voxel_a / 2
    for i, (elev, azim, name) in enumerate(ISOSURFACE_VIEWS):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        if inside:
            shade = light.shade_normals(normals, fraction=1.0)
            colors = np.clip(base[None, :] * (0.35 + 0.65 * shade[:, None]), 0, 1)
            ax.add_collection3d(Poly3DCollection(tris, facecolors=colors, edgecolors="none", linewidths=0))
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_zlim(centre[2] - half, centre[2] + half)
        ax.set_box_aspect((1, 1, 1), zoom=0.85)
        ax.view_init(elev=elev, azim=azim)
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title + ("" if inside else " (no surface at this level)"), fontsize=10)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.88, wspace=0)
    save_figure(fig, path)
    plt.close(fig)
