"""The latent space of a run with continuous heterogeneity (cryoai train --latent-dim D).

Reads RUN/latent.npz and RUN/poses.star and writes to OUTDIR (default RUN/analyze):
  latent.png          the particles' latent vectors (z1 against z2, density), with each
                      dimension's histogram; latent_LABEL.png coloured by each --color-by column
  umap.png            a UMAP of the latent vectors (when umap-learn is installed and D > 2)
  pcK/map_NN.mrc      the maps along each principal direction K (--pcs), from its 5th to its
                      95th percentile (--steps maps, the other dimensions at the mean of the
                      particles nearest each step, so that a curved motion is followed; with
                      --straight, at 0): open them as a volume series in ChimeraX; pcK.png
                      shows their projections side by side
  kmeansK/centre_NN.mrc  the maps at the centres of K k-means clusters of the latent vectors
                      (--kmeans), kmeansK/labels.txt each particle's cluster (1..K)
  analyze.html        all of it on one page
The latent coordinates are in standard deviations of the particles' spread along each
principal direction (z1 the direction along which the maps change most).

Example: cryoai train particles.star --latent-dim 4 --outdir run
         cryoai analyze run --color-by rlnDefocusU --kmeans 5
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

import numpy as np

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a cryoai train run directory with latent.npz (--latent-dim)")
    parser.add_argument("--outdir", default=None, help="where the plots and maps go (default: RUN/analyze)")
    parser.add_argument("--pcs", type=int, default=2,
                        help="principal directions to show as map series (default 2, at most D)")
    parser.add_argument("--steps", type=int, default=10, help="maps per principal direction (default 10)")
    parser.add_argument("--kmeans", type=int, default=5,
                        help="k-means clusters of the latent vectors, a map at each centre "
                             "(default 5; 0: none)")
    parser.add_argument("--color-by", nargs="+", default=None, metavar="LABEL",
                        help="columns to colour the latent plots by: STAR labels of RUN/poses.star "
                             "(e.g. rlnDefocusU, rlnClassNumber) or columns of --table (default: "
                             "rlnClassNumber and rlnDefocusU where present)")
    parser.add_argument("--table", default=None,
                        help="a CSV with one row per particle (e.g. a simulation's truth.csv) whose "
                             "columns --color-by can name")
    parser.add_argument("--straight", action="store_true",
                        help="the maps along each direction with the other coordinates at 0 (a straight "
                             "line through the mean), not through the particles")
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means and UMAP")


def colour_columns(run: Path, table: str | None, wanted: list[str] | None, n: int) -> dict[str, np.ndarray]:
    """The per-particle columns to colour by: ``wanted`` from the run's poses.star or ``table``
    (a CSV); each must have ``n`` rows.
    """
    import pandas as pd

    from ..io.star import read_star_columns

    defaults = ("rlnClassNumber", "rlnDefocusU")
    names = set(wanted or defaults)
    available: dict[str, np.ndarray] = {}
    star = run / "poses.star"
    if star.exists():
        available.update({k: np.asarray(v) for k, v in read_star_columns(star, names.__contains__).items()})
    if table:
        try:
            frame = pd.read_csv(table)
        except (OSError, ValueError) as exc:
            raise InputError(f"{table}: not a readable CSV ({exc})") from None
        if len(frame) != n:
            raise InputError(f"{table}: {len(frame)} rows, but the run has {n} particles")
        available.update({c: frame[c].to_numpy() for c in frame.columns})
    if wanted is None:
        return {k: available[k] for k in defaults if k in available}
    missing = [w for w in wanted if w not in available]
    if missing:
        raise InputError(f"--color-by {' '.join(missing)}: not a column of {star}"
                         + (f" or {table}" if table else ""))
    out = {}
    for w in wanted:
        values = np.asarray(available[w])
        if not np.issubdtype(values.dtype, np.number):
            values = pd.factorize(values)[0]
        out[w] = values
    return out


def _plot_latent(z: np.ndarray, path: Path, colour: np.ndarray | None = None, label: str = "") -> None:
    from ..evaluation.plots import _pyplot, save_figure

    plt = _pyplot()
    d = z.shape[1]
    if colour is None:
        fig, axes = plt.subplots(1, 1 + min(d, 4), figsize=(3.2 * (1 + min(d, 4)), 3.2), dpi=110)
        axes = np.atleast_1d(axes)
        if d >= 2:
            axes[0].hexbin(z[:, 0], z[:, 1], gridsize=50, bins="log", cmap="viridis")
            axes[0].set_xlabel("z1")
            axes[0].set_ylabel("z2")
        else:
            axes[0].hist(z[:, 0], bins=80, color="0.3")
            axes[0].set_xlabel("z1")
        axes[0].set_title("particles (density)", fontsize=9)
        for k in range(min(d, 4)):
            axes[k + 1].hist(z[:, k], bins=80, color="tab:blue")
            axes[k + 1].set_xlabel(f"z{k + 1}")
            axes[k + 1].set_yticks([])
    else:
        fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
        y = z[:, 1] if d >= 2 else np.random.default_rng(0).normal(0, 0.05, len(z))
        order = np.random.default_rng(0).permutation(len(z))  # no colour drawn all on top
        points = ax.scatter(z[order, 0], y[order], c=colour[order], s=2, cmap="viridis", rasterized=True)
        fig.colorbar(points, ax=ax, label=label)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2" if d >= 2 else "(jitter)")
        ax.set_title(f"coloured by {label}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _plot_series(volumes: list[np.ndarray], path: Path, title: str) -> None:
    """Each map's projection along z and along x, side by side (the motion at a glance)."""
    from ..evaluation.plots import _pyplot, save_figure

    plt = _pyplot()
    k = len(volumes)
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 2.8), dpi=110)
    axes = np.asarray(axes).reshape(2, k)
    projections = [[v.sum(0) for v in volumes], [v.sum(2) for v in volumes]]
    for row in range(2):
        lo = min(p.min() for p in projections[row])
        hi = max(p.max() for p in projections[row])
        for j in range(k):
            axes[row, j].imshow(projections[row][j], cmap="gray", origin="lower", vmin=lo, vmax=hi)
            axes[row, j].axis("off")
            if row == 0:
                axes[row, j].set_title(str(j + 1), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def analyze(run_dir: str | Path, outdir: str | Path | None = None, *, pcs: int = 2, steps: int = 10,
            kmeans: int = 5, color_by: list[str] | None = None, table: str | None = None, seed: int = 0,
            straight: bool = False, say=print) -> dict:
    """Everything ``cryoai analyze`` writes (module docstring); returns a summary dict."""
    from ..evaluation.report import write_page
    from ..io import write_json_atomic
    from ..io.mrc import write_volume
    from ..reconstruction.latent import kmeans_centres, latent_traversal, read_latent

    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: not a run directory")
    model, background, pixel_size_a = read_latent(run / "latent.npz")
    out = Path(outdir) if outdir else run / "analyze"
    out.mkdir(parents=True, exist_ok=True)
    if steps < 2 or pcs < 1 or kmeans < 0:
        raise InputError("--steps must be 2 or more, --pcs 1 or more, --kmeans 0 or more")
    z_all = model.z
    rows = np.flatnonzero(np.isfinite(z_all).all(axis=1))
    z = z_all[rows]
    summary = {"particles": int(len(rows)), "dim": model.dim,
               "determined": [float(v) for v in model.variance],
               "resolution_a": model.box_px * pixel_size_a / model.band_px}
    figures = [("latent.png", "The particles' latent vectors: z1 against z2 (density), and each dimension.")]
    _plot_latent(z, out / "latent.png")
    for label, values in colour_columns(run, table, color_by, len(z_all)).items():
        name = f"latent_{label}.png"
        _plot_latent(z, out / name, np.asarray(values, dtype=np.float64)[rows], label)
        figures.append((name, f"The latent vectors coloured by {label}."))
    if model.dim > 2:
        try:
            import umap  # (optional: pip install cryoai[analysis])
        except ImportError:
            say("analyze: no UMAP (umap-learn is not installed: pip install umap-learn)")
        else:
            embedding = umap.UMAP(random_state=seed, n_jobs=1).fit_transform(z)
            np.savetxt(out / "umap.txt", embedding, fmt="%.4f")
            _plot_latent(embedding, out / "umap.png")
            figures.append(("umap.png", "UMAP of the latent vectors (density)."))
    series = {}
    for k in range(min(pcs, model.dim)):
        folder = out / f"pc{k + 1}"
        folder.mkdir(exist_ok=True)
        zs = latent_traversal(model, k, steps, rows=rows, through_particles=not straight)
        volumes = []
        for j, zk in enumerate(zs):
            volume = model.volume(zk, background)
            write_volume(folder / f"map_{j + 1:02d}.mrc", volume, pixel_size_a)
            volumes.append(volume)
        _plot_series(volumes, out / f"pc{k + 1}.png",
                     f"along z{k + 1}: {zs[0, k]:+.2f} to {zs[-1, k]:+.2f} (projections down z, then x)")
        figures.append((f"pc{k + 1}.png",
                        f"{steps} maps along z{k + 1} ({folder.name}/map_01..{steps:02d}.mrc)."))
        series[f"pc{k + 1}"] = zs.tolist()
        say(f"analyze: {steps} maps along z{k + 1} in {folder}")
    if kmeans > 0:
        k = min(kmeans, len(z))
        centres, labels = kmeans_centres(z, k, seed=seed)
        folder = out / f"kmeans{k}"
        folder.mkdir(exist_ok=True)
        full = np.zeros(len(z_all), dtype=np.int64)
        full[rows] = labels + 1
        np.savetxt(folder / "labels.txt", full, fmt="%d")
        np.savetxt(folder / "centres.txt", centres, fmt="%.4f")
        volumes = [model.volume(c, background) for c in centres]
        for j, volume in enumerate(volumes):
            write_volume(folder / f"centre_{j + 1:02d}.mrc", volume, pixel_size_a)
        _plot_series(volumes, out / f"kmeans{k}.png", f"maps at the {k} k-means centres")
        figures.append((f"kmeans{k}.png", f"Maps at the {k} k-means centres ({folder.name}/centre_NN.mrc); "
                        "sizes " + ", ".join(str(int((labels == j).sum())) for j in range(k)) + "."))
        summary["kmeans_sizes"] = [int((labels == j).sum()) for j in range(k)]
    summary["series"] = series
    write_json_atomic(out / "analyze.json", summary)
    rows_html = [("particles", f"{len(rows):,}"), ("latent dimensions", str(model.dim)),
                 ("resolution of the model", f"{summary['resolution_a']:.1f} A"),
                 ("share of each dimension's spread the images determine",
                  ", ".join(f"z{k + 1} {v:.2f}" for k, v in enumerate(model.variance)))]
    body = "<table>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>"
                               for a, b in rows_html) + "</table>"
    body += "".join(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>'
                    f"{html.escape(caption)}</figcaption></figure>" for name, caption in figures)
    write_page(out / "analyze.html", f"cryoai analyze: {run.name}", body)
    say(f"analyze: {out / 'analyze.html'}")
    return summary


def main(args) -> int:
    analyze(args.run, args.outdir, pcs=args.pcs, steps=args.steps, kmeans=args.kmeans, color_by=args.color_by,
            table=args.table, seed=args.seed, straight=args.straight)
    return 0
