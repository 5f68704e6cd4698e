"""Losses on the kept half of the spectra (Parseval: equal to real-space squared errors)."""

from __future__ import annotations

import torch

from ..models.image_formation import ImageFormation


def squared_error(target: torch.Tensor, prediction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image weighted squared error ``sum_k w_k |Y_k - X_k|^2``; (B, M) -> (B,)."""
    return ((target - prediction).abs() ** 2 * weight).sum(-1)


def symmetric_loss_terms(target: torch.Tensor, prediction: torch.Tensor,
                         weight: torch.Tensor) -> torch.Tensor:
    """Squared errors of the image and of the image rotated by 180 degrees in plane, (B, 2).

    The exact 180-degree rotation of a real image conjugates its centred spectrum (CONVENTIONS.md),
    so the second column compares ``conj(Y)`` with the prediction.
    """
    return torch.stack([squared_error(target, prediction, weight),
                        squared_error(target.conj(), prediction, weight)], dim=-1)


def symmetric_loss(target: torch.Tensor, prediction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CryoAI's symmetric loss per image: min over {image, image rotated by pi}; (B,)."""
    return symmetric_loss_terms(target, prediction, weight).min(dim=-1).values


def pose_loss_terms(formation: ImageFormation, decoder: torch.nn.Module, spectra: torch.Tensor,
                    ctf: torch.Tensor, rotations: torch.Tensor, shifts_a: torch.Tensor, *,
                    symmetric: bool, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Squared errors of images against the decoder's predictions at H pose hypotheses each.

    The one loss of the model: training takes its minimum over hypotheses and paths (winner
    takes all; cryoAI's symmetric loss), pose prediction its argmin, and training with fixed
    poses is the case H = 1 without the symmetric path.

    Parameters
    ----------
    formation : the image formation (layout, render).
    decoder : the volume.
    spectra : (B, M') image coefficients, at the coefficients ``keep`` selects.
    ctf : (B, M') CTFs at the same coefficients.
    rotations : (B, H, 3, 3) pose hypotheses.
    shifts_a : (B, H, 2) their shifts, Angstrom.
    symmetric : also score the image rotated by 180 degrees in plane.
    keep : optional boolean (M,) selecting the coefficients used (a frequency band).

    Returns
    -------
    (B, H, K) per-image errors (Hermitian-weighted sums over the coefficients), K = 2 with
    ``symmetric`` (index 1: the rotated image), else 1.
    """
    b, h = rotations.shape[:2]
    weight = formation.hermitian_weight if keep is None else formation.hermitian_weight[keep]
    pred = formation.render(decoder, rotations.reshape(b * h, 3, 3), shifts_a.reshape(b * h, 2),
                            ctf.repeat_interleave(h, dim=0), keep)
    target = spectra.repeat_interleave(h, dim=0)
    if symmetric:
        terms = symmetric_loss_terms(target, pred, weight)
    else:
        terms = squared_error(target, pred, weight)[:, None]
    return terms.reshape(b, h, -1)
