"""The maps in 3D for the run report: an interactive isosurface with a threshold slider and a
menu of maps (the run's map and its 3D classes; plotly, written into the page with plotly.js
itself, so it works offline), and a ChimeraX script that opens the map at the same threshold.

plotly draws the isosurface in the browser (WebGL) from the map's values; the page carries the
map Fourier-cropped to at most :data:`MAX_VIEW_PX` voxels a side (enough to see the shape, and
a few MB at most), and the slider changes the isosurface's level without a server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..physics.fft import fft3_c, ifft3_c
from ..physics.masks import spherical_mask

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


def shown_map(volume: np.ndarray, pixel_size_a: float, resolution_a: float | None = None,
              mask_radius_px: float | None = None) -> tuple[np.ndarray, float, list[float], float]:
    """The map as the 3D view and its print thumbnails show it: Fourier-cropped to at most
    :data:`MAX_VIEW_PX` voxels a side, low-passed to ``resolution_a`` (None: not) and, where
    ``mask_radius_px`` is given, under the run's soft spherical mask (so that noise at the box's
    faces does not hide the molecule); its levels are measured before the mask.

    Returns
    -------
    The shown map, its voxel size in Angstrom, the slider's levels and the default level
    (:func:`map_levels` of the unmasked shown map).
    """
    n = volume.shape[-1]
    shown = _shown(np.asarray(volume, dtype=np.float64), MAX_VIEW_PX, pixel_size_a, resolution_a)
    m = shown.shape[-1]
    levels, default = map_levels(shown)
    if mask_radius_px is not None:
        shown = shown * spherical_mask(m, mask_radius_px * m / n, soft_edge_px=4 * m / n,
                                       dtype=torch.float64).numpy()
    return shown, pixel_size_a * n / m, levels, default


def view3d_html(maps: list[tuple[str, np.ndarray]], pixel_size_a: float,
                resolution_a: float | None = None, mask_radius_px: float | None = None,
                div_id: str = "view3d") -> str:
    """An HTML fragment: the isosurface of each map (plotly, with plotly.js inlined; low-passed
    to ``resolution_a`` where given), a menu that picks the map shown (where there are several:
    the run's map and its 3D classes) and a slider of levels, each map at the same number of
    standard deviations of its own solvent. The page's ``<body>`` gets ``data-view3d="ok"``
    once the view has drawn.

    Parameters
    ----------
    maps : (name, (N, N, N) map) pairs, all at ``pixel_size_a``; the first is shown first.
    pixel_size_a : Angstrom per voxel of the maps.
    resolution_a : the low-pass of the view (the map's resolution), or None.
    mask_radius_px : the run's map mask radius (px of the maps' box), or None (no mask).
    div_id : the HTML id of the view's ``<div>``.
    """
    import plotly.graph_objects as go

    if not maps:
        raise ValueError("view3d_html needs at least one map")
    traces, levels = [], []
    step_a = pixel_size_a
    for i, (name, volume) in enumerate(maps):
        shown, step_a, map_levels_i, default = shown_map(volume, pixel_size_a, resolution_a, mask_radius_px)
        m = shown.shape[-1]
        levels.append(map_levels_i)
        # Voxel indices (uint8) and float32 values: plotly writes numpy arrays as typed arrays.
        z, y, x = np.meshgrid(*(np.arange(m, dtype=np.uint8),) * 3, indexing="ij")  # [z, y, x] as the map
        traces.append(go.Isosurface(
            x=x.ravel(), y=y.ravel(), z=z.ravel(), value=shown.astype(np.float32).ravel(), isomin=default,
            isomax=default, surface_count=1, caps={"x_show": False, "y_show": False, "z_show": False},
            colorscale=[[0, "#c8a24a"], [1, "#c8a24a"]], showscale=False, name=name, visible=i == 0,
            lighting={"ambient": 0.5, "diffuse": 0.8}))
    fig = go.Figure(traces)
    # restyle with one value per trace: each map at k sd of its own solvent.
    steps = [{"method": "restyle", "label": f"{k:g} sd",
              "args": [{"isomin": [lv[j] for lv in levels], "isomax": [lv[j] for lv in levels]}]}
             for j, k in enumerate(LEVEL_SIGMAS)]
    active = LEVEL_SIGMAS.index(DEFAULT_SIGMA)
    menus = []
    if len(maps) > 1:
        menus = [{"type": "dropdown", "x": 0.0, "y": 1.0, "xanchor": "left", "yanchor": "top",
                  "active": 0, "buttons": [
                      {"method": "restyle", "label": name,
                       "args": [{"visible": [j == i for j in range(len(maps))]}]}
                      for i, (name, _) in enumerate(maps)]}]
    fig.update_layout(
        height=520, margin={"l": 0, "r": 0, "t": 30, "b": 0}, updatemenus=menus,
        scene={"aspectmode": "data", **{f"{a}axis_title": f"{a} (voxels of {step_a:.3g} A)" for a in "xyz"}},
        sliders=[{"active": active, "currentvalue": {"prefix": "level above the solvent: "}, "steps": steps,
                  "pad": {"t": 10}}],
        title={"text": "isosurface (drag to turn; the slider sets the level"
                       + ("; the menu picks the map)" if len(maps) > 1 else ")"),
               "font": {"size": 12}, "x": 0.5})
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


__all__ = ["map_levels", "shown_map", "view3d_html", "write_chimerax_script"]
