"""The map in 3D for the run report: an interactive isosurface with a threshold slider (plotly,
written into the page with plotly.js itself, so it works offline), and a ChimeraX script that
opens the map at the same threshold.

plotly draws the isosurface in the browser (WebGL) from the map's values; the page carries the
map Fourier-cropped to at most :data:`MAX_VIEW_PX` voxels a side (enough to see the shape, and
a few MB at most), and the slider changes the isosurface's level without a server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..physics.fft import fft3_c, ifft3_c

#: The largest box the 3D view carries (the map is Fourier-cropped to it: about 1 MB of values).
MAX_VIEW_PX = 64
#: The slider's levels, in standard deviations of the solvent above its mean.
LEVEL_SIGMAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
#: The level the view and the ChimeraX script open at (3 standard deviations of the solvent, the
#: usual first contour of a map).
DEFAULT_SIGMA = 3.0
#: The solvent: the voxels beyond this fraction of the box from its centre (outside a mask that
#: fits the particle, inside the box).
SOLVENT_RADIUS_FRAC = 0.45


def _shown(volume: np.ndarray, size: int, pixel_size_a: float, resolution_a: float | None) -> np.ndarray:
    """``volume`` Fourier-cropped to ``size`` voxels a side (if larger), under a Gaussian low-pass
    whose amplitude falls to exp(-1/2) at ``resolution_a`` (None: none): the view shows what
    the map resolves, not its noise beyond.
    """
    n = volume.shape[-1]
    f = fft3_c(torch.as_tensor(volume, dtype=torch.float64))
    if resolution_a is not None and resolution_a > 0:
        g = torch.arange(n, dtype=torch.float64) - n // 2
        k2 = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / (n * pixel_size_a) ** 2
        f = f * torch.exp(-0.5 * k2 * resolution_a**2)
    m = min(n, size)
    lo = n // 2 - m // 2
    f = f[lo:lo + m, lo:lo + m, lo:lo + m]
    return (ifft3_c(f).real * (m / n) ** 3).numpy()


def map_levels(volume: np.ndarray) -> tuple[list[float], float]:
    """The slider's levels (:data:`LEVEL_SIGMAS`) and the default one (:data:`DEFAULT_SIGMA`), in
    standard deviations of the solvent (the voxels beyond :data:`SOLVENT_RADIUS_FRAC` of the box)
    above its mean.
    """
    n = volume.shape[-1]
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    solvent = volume[r > SOLVENT_RADIUS_FRAC * n]
    mean, sd = float(solvent.mean()), float(solvent.std()) or float(volume.std()) or 1.0
    return [mean + k * sd for k in LEVEL_SIGMAS], mean + DEFAULT_SIGMA * sd


def view3d_html(volume: np.ndarray, pixel_size_a: float, resolution_a: float | None = None,
                div_id: str = "view3d") -> str:
    """An HTML fragment: the map's isosurface (plotly, with plotly.js inlined; low-passed to
    ``resolution_a`` where given) and a slider of levels. The page's ``<body>`` gets
    ``data-view3d="ok"`` once the view has drawn.
    """
    import plotly.graph_objects as go

    n = volume.shape[-1]
    shown = _shown(np.asarray(volume, dtype=np.float64), MAX_VIEW_PX, pixel_size_a, resolution_a)
    m = shown.shape[-1]
    step_a = pixel_size_a * n / m
    levels, default = map_levels(shown)
    # Voxel indices (uint8) and float32 values: plotly writes numpy arrays as typed arrays.
    z, y, x = np.meshgrid(*(np.arange(m, dtype=np.uint8),) * 3, indexing="ij")  # [z, y, x] as the map
    values = shown.astype(np.float32)
    surface = go.Isosurface(x=x.ravel(), y=y.ravel(), z=z.ravel(), value=values.ravel(), isomin=default,
                            isomax=default, surface_count=1,
                            caps={"x_show": False, "y_show": False, "z_show": False},
                            colorscale=[[0, "#c8a24a"], [1, "#c8a24a"]], showscale=False,
                            lighting={"ambient": 0.5, "diffuse": 0.8})
    fig = go.Figure(surface)
    steps = [{"method": "restyle", "args": [{"isomin": [lv], "isomax": [lv]}], "label": f"{k:g} sd"}
             for k, lv in zip(LEVEL_SIGMAS, levels, strict=True)]
    active = LEVEL_SIGMAS.index(DEFAULT_SIGMA)
    fig.update_layout(
        height=520, margin={"l": 0, "r": 0, "t": 30, "b": 0},
        scene={"aspectmode": "data", **{f"{a}axis_title": f"{a} (voxels of {step_a:.3g} A)" for a in "xyz"}},
        sliders=[{"active": active, "currentvalue": {"prefix": "level above the solvent: "}, "steps": steps,
                  "pad": {"t": 10}}],
        title={"text": "isosurface (drag to turn; the slider sets the level)", "font": {"size": 12}})
    post = ("var b = document.body; if (b) { b.setAttribute('data-view3d', "
            "document.querySelector('#" + div_id + " canvas') ? 'ok' : 'no-canvas'); }")
    return fig.to_html(full_html=False, include_plotlyjs=True, div_id=div_id, post_script=post,
                       config={"displaylogo": False})


def write_chimerax_script(path: str | Path, map_name: str, level: float) -> Path:
    """A ChimeraX ``.cxc`` beside the map that opens it (``map_name``, relative to the script's
    folder: ChimeraX runs a script from its own folder) as a surface at ``level``.
    """
    path = Path(path)
    path.write_text(f"# open with: chimerax {path.name}  (from this folder)\n"
                    f"open {map_name}\n"
                    f"volume #1 style surface level {level:.6g}\n"
                    "view\n")
    return path


__all__ = ["map_levels", "view3d_html", "write_chimerax_script"]
