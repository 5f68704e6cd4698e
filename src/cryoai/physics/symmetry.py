"""Point-group symmetry of a map: the operators of the cyclic and dihedral groups.

A map ``V`` with symmetry ``S`` (``V(S x) = V(x)``) projects the same image at the poses ``R``
and ``S R`` (:mod:`cryoai.physics.rotations`: a pose maps the image frame to the volume frame),
so a pose is known only up to the group. The axes follow RELION's convention (``--sym``): the
n-fold axis along z, and for ``Dn`` a two-fold axis along x.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import InputError
from .rotations import rot_z


def point_group(symbol: str) -> torch.Tensor:
    """The rotations of a point group, (G, 3, 3) float64, the identity first.

    Parameters
    ----------
    symbol : ``C1`` (no symmetry), ``Cn`` or ``Dn`` (n >= 1), case-insensitive. The cubic
        groups (T, O, I) are not supported.
    """
    match = re.fullmatch(r"([CcDd])(\d+)", symbol.strip())
    if match is None or int(match.group(2)) < 1:
        raise InputError(f"symmetry {symbol!r}: expected Cn or Dn with n >= 1 (e.g. C1, C4, D2)")
    kind, n = match.group(1).upper(), int(match.group(2))
    cyclic = rot_z(torch.arange(n, dtype=torch.float64) * (2 * math.pi / n))
    if kind == "C":
        return cyclic
    two_fold_x = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    return torch.cat([cyclic, two_fold_x @ cyclic])


__all__ = ["point_group"]
