"""Viewing-direction distributions of simulated particles, and how well a set of views samples
Fourier space (the sampling compensation factor, SCF).

A particle seen with rotation ``R`` (CONVENTIONS.md: ``image(x, y) = sum_z V(R @ (x, y, z))``) is
projected along the volume-frame axis ``R @ e_z``, its *viewing direction*: the third column of
``R``. Its central slice is the plane through the origin normal to that direction.

Distributions (Baldwin & Lyumkis 2020, Prog Biophys Mol Biol 150:160, figure 4):

- ``uniform``: Haar-uniform rotations;
- ``cluster``: a fraction of the particles with directions from a von Mises-Fisher distribution
  of concentration ``kappa`` about a preferred axis, the rest uniform (a partly preferred view);
- ``top_cone``: directions uniform within a cone of half-angle ``alpha`` about the axis (the
  "top-like" views of particles lying flat on the air-water interface), except a fraction
  ``epsilon`` uniform over the sphere;
- ``side``: directions uniform on the great circle normal to the axis (pure side views).

In-plane angles are uniform in every case.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..physics.rotations import random_rotations

VIEW_KINDS = ("uniform", "cluster", "top_cone", "side")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def rotations_with_directions(directions: torch.Tensor, psi_rad: torch.Tensor) -> torch.Tensor:
    """Rotations (n, 3, 3) whose viewing direction (third column) is ``directions`` (n, 3), unit
    vectors, turned in-plane by ``psi_rad`` (n,) about it.
    """
    d = _unit(directions.double())
    helper = torch.zeros_like(d)
    helper[:, 0] = 1.0
    near_x = d[:, 0].abs() > 0.9
    helper[near_x, 0] = 0.0
    helper[near_x, 1] = 1.0
    e1 = _unit(torch.linalg.cross(helper, d))
    e2 = torch.linalg.cross(d, e1)  # e1 x e2 = d: right-handed
    c, s = torch.cos(psi_rad.double())[:, None], torch.sin(psi_rad.double())[:, None]
    a, b = c * e1 + s * e2, -s * e1 + c * e2
    return torch.stack([a, b, d], dim=-1)


def _vmf_directions(n: int, axis: torch.Tensor, kappa: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` directions from the von Mises-Fisher distribution on S^2 about ``axis`` (Wood 1994,
    exact for the 2-sphere: ``w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa``).
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    if kappa > 0:
        w = 1 + torch.log(u + (1 - u) * math.exp(-2 * kappa)) / kappa
    else:
        w = 2 * u - 1
    return _around(axis, w.clamp(-1, 1), phi)


def _around(axis: torch.Tensor, cos_theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Directions at polar cosine ``cos_theta`` and azimuth ``phi`` about ``axis`` (3,)."""
    z = _unit(axis.double())[None]
    frame = rotations_with_directions(z, torch.zeros(1, dtype=torch.float64))[0]  # columns e1, e2, z
    sin_theta = (1 - cos_theta**2).clamp_min(0).sqrt()
    local = torch.stack([sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), cos_theta], dim=-1)
    return local @ frame.T


def sample_views(n: int, kind: str, generator: torch.Generator, *, axis=(0.0, 0.0, 1.0),
                 fraction: float = 0.3, kappa: float = 10.0, cone_half_angle_deg: float = 30.0,
                 uniform_fraction: float = 0.5) -> torch.Tensor:
    """``n`` rotations (float64, (n, 3, 3)) from a view distribution (see the module docstring).

    Parameters
    ----------
    kind : ``uniform``, ``cluster``, ``top_cone`` or ``side``.
    generator : the random stream (every draw is made, whatever the kind's parameters, so that a
        particle's other random values do not depend on them).
    axis : the preferred axis (volume frame).
    fraction : ``cluster``: the share of particles in the cluster.
    kappa : ``cluster``: the von Mises-Fisher concentration (10: about 25 deg wide).
    cone_half_angle_deg : ``top_cone``: the cone's half-angle.
    uniform_fraction : ``top_cone``: the share of particles uniform over the sphere (epsilon).
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"view distribution {kind!r}: choose from {', '.join(VIEW_KINDS)}")
    uniform = random_rotations(n, generator=generator, dtype=torch.float64)
    pick = torch.rand(n, generator=generator, dtype=torch.float64)
    psi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    axis_t = torch.as_tensor(axis, dtype=torch.float64)
    if kind == "uniform":
        return uniform
    if kind == "cluster":
        special = pick < fraction
        directions = _vmf_directions(n, axis_t, kappa, generator)
    elif kind == "top_cone":
        special = pick >= uniform_fraction
        cos_alpha = math.cos(math.radians(cone_half_angle_deg))
        directions = _around(axis_t, 1 - u * (1 - cos_alpha), phi)  # uniform in the cap
    else:  # side
        special = torch.ones(n, dtype=torch.bool)
        directions = _around(axis_t, torch.zeros(n, dtype=torch.float64), phi)
    out = uniform.clone()
    out[special] = rotations_with_directions(directions[special], psi[special])
    return out


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors (n, 3) (the Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(1 - z**2)
    phi = math.pi * (3 - math.sqrt(5)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def sampling_compensation_factor(rotations: np.ndarray, *, plane_width_deg: float = 3.0,
                                 n_directions: int = 2000, max_views: int = 20000) -> float:
    """The SCF of a set of views (Baldwin & Lyumkis 2020): the reciprocal of the mean, over
    directions of Fourier space, of the reciprocal of the (normalised) sampling.

    The sampling of a direction ``k`` is the share of central slices through it: each view
    whose direction ``d`` has ``|d . k|`` small, with a Gaussian of ``plane_width_deg`` for the
    slices' thickness. It is normalised by its mean over the sphere (every slice covers the
    same great circle, so the mean is that of uniform views), making the SCF 1 for uniform
    views, ``8 / pi^2 = 0.81`` for pure side views and near 0 when a cone of directions gets no
    slice (top views). cryoSPARC flags a set at SCF* < 0.81.

    Parameters
    ----------
    rotations : (n, 3, 3) the views (at most ``max_views`` of them are used, evenly spaced).
    plane_width_deg : the slices' thickness (sd), degrees.
    n_directions : Fourier-space directions averaged over (a Fibonacci sphere).

    Returns
    -------
    The SCF, in (0, 1].
    """
    rot = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    if len(rot) > max_views:
        rot = rot[np.linspace(0, len(rot) - 1, max_views).astype(int)]
    views = rot[:, :, 2]  # (n, 3) viewing directions
    k = _fibonacci_sphere(n_directions)
    width = math.sin(math.radians(plane_width_deg))
    sampling = np.zeros(len(k))
    for start in range(0, len(views), 2000):
        dots = views[start:start + 2000] @ k.T  # (b, K)
        sampling += np.exp(-0.5 * (dots / width) ** 2).sum(axis=0)
    sampling /= sampling.mean()
    floor = 1e-3  # a direction no slice reaches counts as sampled 1000x less than average
    return float(1.0 / np.mean(1.0 / np.maximum(sampling, floor)))


__all__ = ["VIEW_KINDS", "rotations_with_directions", "sample_views", "sampling_compensation_factor"]
