"""Point-group symmetry of a map: the rotations of the groups RELION names (``--sym``).

A map ``V`` with symmetry ``S`` (``V(S x) = V(x)``) projects the same image at the poses ``R``
and ``S R`` (:mod:`cryoai.physics.rotations`: a pose maps the image frame to the volume frame),
so a pose is known only up to the group. The groups are placed as RELION places them (its
symmetry library is XMIPP's; the RELION documentation's "Conventions" page), so that maps and
poses exchanged with RELION mean the same:

- ``Cn``: the n-fold axis on z;
- ``Dn``: the n-fold axis on z, a two-fold on x;
- ``T``: a three-fold on z, a two-fold in the yz plane (54.7356 deg from z, towards +y);
  RELION's own setting, not Heymann et al.'s (two-folds on x, y, z);
- ``O``: four-folds on x, y and z;
- ``I1``: two-folds on x, y, z, the front-most five-folds (seen from +z) in the yz plane;
  ``I2``: the same, rotated 90 deg about z (five-folds in the xz plane, Crowther's setting);
  ``I3``: a five-fold on z, a two-fold on y, one of the five-folds next to z in the -x half of
  the xz plane; ``I4``: the same with that five-fold in the +x half.

``I`` alone is refused: programs differ on which setting it means.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import InputError
from .rotations import axis_angle_to_matrix, rot_z

#: The golden ratio: the icosahedron's five-fold axes in the 222 setting are the cyclic
#: permutations of (0, +-1, +-PHI).
PHI = (1 + math.sqrt(5)) / 2

_SYMBOLS = "C1, Cn, Dn (n >= 1), T, O, I1, I2, I3 or I4 (RELION's names)"


def _about(axis: tuple[float, float, float], fold: int) -> torch.Tensor:
    """The rotation by 360/fold degrees about ``axis`` (3, 3) float64."""
    a = torch.tensor(axis, dtype=torch.float64)
    return axis_angle_to_matrix(a / a.norm() * (2 * math.pi / fold))


def generated_group(generators: list[torch.Tensor] | torch.Tensor, order: int | None = None) -> torch.Tensor:
    """Every product of ``generators`` (rotations of a finite group: the group they generate),
    (G, 3, 3) float64, the identity first; with ``order``, checks that the group has that many.
    """
    generators = [torch.as_tensor(h, dtype=torch.float64) for h in generators]
    elements = [torch.eye(3, dtype=torch.float64)]
    frontier = list(elements)
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if all(float((p - e).abs().max()) > 1e-6 for e in elements):
                    elements.append(p)
                    new.append(p)
        frontier = new
    if order is not None and len(elements) != order:  # a wrong generator: a bug, not the user's input
        raise AssertionError(f"generated {len(elements)} rotations, expected {order}")
    return torch.stack(elements)


def _icosahedral_222() -> torch.Tensor:
    """I1: two-folds on x, y, z; five-folds along the cyclic permutations of (0, +-1, +-PHI)."""
    return generated_group([_about((0.0, 0.0, 1.0), 2), _about((1.0, 0.0, 0.0), 2),
                            _about((1.0, 1.0, 1.0), 3), _about((0.0, 1.0, PHI), 5)], 60)


def _conjugate(group: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The group turned by ``rotation``: ``Q S Q^T`` for every element ``S``."""
    return rotation @ group @ rotation.T


def point_group(symbol: str) -> torch.Tensor:
    """The rotations of a point group, (G, 3, 3) float64, the identity first.

    Parameters
    ----------
    symbol : ``C1`` (no symmetry), ``Cn``, ``Dn`` (n >= 1), ``T``, ``O``, ``I1``-``I4``,
        case-insensitive, placed as RELION places them (module docstring).
    """
    text = symbol.strip().upper()
    cyclic_or_dihedral = re.fullmatch(r"([CD])(\d+)", text)
    if cyclic_or_dihedral is not None and int(cyclic_or_dihedral.group(2)) >= 1:
        kind, n = cyclic_or_dihedral.group(1), int(cyclic_or_dihedral.group(2))
        cyclic = rot_z(torch.arange(n, dtype=torch.float64) * (2 * math.pi / n))
        if kind == "C":
            return cyclic
        two_fold_x = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
        return torch.cat([cyclic, two_fold_x @ cyclic])
    if text == "T":
        two_fold = _about((0.0, math.sqrt(2 / 3), math.sqrt(1 / 3)), 2)
        return generated_group([_about((0.0, 0.0, 1.0), 3), two_fold], 12)
    if text == "O":
        return generated_group([_about((0.0, 0.0, 1.0), 4), _about((1.0, 0.0, 0.0), 4)], 24)
    if text in ("I1", "I2", "I3", "I4"):
        group = _icosahedral_222()
        if text == "I2":
            return _conjugate(group, rot_z(torch.tensor(math.pi / 2, dtype=torch.float64)))
        if text in ("I3", "I4"):
            # The five-fold (0, 1, PHI) turned onto z about x (the two-fold on x stays on x), then
            # 90 deg about z (that two-fold onto y); I4 is I3 turned 180 deg about z.
            onto_z = axis_angle_to_matrix(torch.tensor([math.atan2(1.0, PHI), 0.0, 0.0], dtype=torch.float64))
            turn = -math.pi / 2 if text == "I3" else math.pi / 2
            return _conjugate(group, rot_z(torch.tensor(turn, dtype=torch.float64)) @ onto_z)
        return group
    raise InputError(f"symmetry {symbol!r}: expected {_SYMBOLS}, e.g. C1, C4, D7, O, I1")


def group_axes(group: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The rotation axes of a group: (fold, unit axis (3,)) for each axis, both directions of an
    axis counted once (its direction chosen with its first non-zero coordinate positive).
    """
    axes: list[tuple[int, torch.Tensor]] = []
    for g in group[1:]:
        angle = math.acos(max(-1.0, min(1.0, (float(torch.trace(g)) - 1) / 2)))
        w, v = torch.linalg.eigh((g + g.T) / 2)  # the axis: eigenvector of eigenvalue 1
        axis = v[:, int((w - 1).abs().argmin())]
        first = axis[axis.abs() > 1e-9][0]
        axis = axis * torch.sign(first)
        fold = round(2 * math.pi / angle)
        for k, (f, a) in enumerate(axes):
            if float((a - axis).abs().max()) < 1e-6:
                axes[k] = (max(f, fold), a)
                break
        else:
            axes.append((fold, axis))
    return axes


def rotation_angle(rotations: torch.Tensor) -> torch.Tensor:
    """The angle (rad) of each rotation (..., 3, 3) about its axis, in [0, pi]."""
    trace = rotations.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.acos(((trace - 1) / 2).clamp(-1.0, 1.0))


def asymmetric_unit(rotations: torch.Tensor, group: torch.Tensor, margin_rad: float = 0.0) -> torch.Tensor:
    """Which poses lie in one asymmetric unit of a group (a bool mask (R,)): those nearer the
    identity than any of their equivalents ``S R``, within ``margin_rad``.

    The poses ``R`` and ``S R`` give the same image of a map with symmetry ``S``; the set of poses
    at least as near the identity as each of their equivalents (the Dirichlet cell of the identity
    under the group) holds one of every ``G`` equivalent poses, so a pose search over it finds
    each particle's pose up to the group at ``1/G`` of the cost. On a grid, a pose's nearest grid
    point may lie just outside the cell: ``margin_rad`` of twice the grid's covering radius keeps
    it (the triangle inequality).

    Parameters
    ----------
    rotations : (R, 3, 3) poses.
    group : (G, 3, 3) the group's operators.
    margin_rad : how much nearer an equivalent may be, radians.
    """
    g = group.to(rotations.dtype).to(rotations.device)
    own = rotation_angle(rotations)  # the distance to the identity
    others = rotation_angle(torch.einsum("kab,rbc->rkac", g[1:], rotations)) if len(g) > 1 else own[:, None]
    return own <= others.min(dim=1).values + margin_rad


__all__ = ["PHI", "asymmetric_unit", "generated_group", "group_axes", "point_group", "rotation_angle"]
