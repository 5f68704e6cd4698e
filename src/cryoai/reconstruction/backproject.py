"""Back-projection: image spectra inserted into a 3D Fourier grid at their poses.

For images ``Y_i`` with CTF ``C_i``, shift phases ``T_i`` and rotations ``R_i`` the sums

    numerator(k)   = sum_i C_i conj(T_i) Y_i   inserted at R_i (kx, ky, 0)
    denominator(k) = sum_i C_i^2               inserted at the same points

are the data terms of the least-squares (and MAP) volume ``numerator / (denominator + lambda)``
(see :mod:`cryoai.reconstruction.regularised`). Insertion is trilinear and the adjoint of
trilinear slicing (:func:`cryoai.physics.projection.sample_volume`).
"""

from __future__ import annotations

import torch

from ..physics.backprojection import insert_slices
from ..physics.projection import slice_coords


def backproject(spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                coords_px: torch.Tensor, box_px: int,
                phases: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert CTF-weighted, unshifted image coefficients into (N, N, N) grids.

    Parameters
    ----------
    spectra : (B, P) complex image coefficients (1/N scale) at ``coords_px``.
    ctf : (B, P) real CTF at the same coefficients.
    rotations : (B, 3, 3) poses, image frame -> volume frame.
    coords_px : (P, 2) frequency pixels of the coefficients (a Hermitian half plane).
    box_px : N.
    phases : optional (B, P) complex phase factors ``T_i`` of the images' shifts (their
        conjugate undoes the shift); None for unshifted images.

    Returns
    -------
    numerator (N, N, N) complex, denominator (N, N, N) real, indexed [z, y, x]; every value is
    also inserted at ``-k`` as its conjugate, so ``numerator / denominator`` is Hermitian.
    """
    values = ctf * spectra
    if phases is not None:
        values = values * phases.conj()
    return insert_slices(values, ctf * ctf, slice_coords(rotations, coords_px), box_px)
