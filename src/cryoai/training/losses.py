"""Losses on the kept half of the spectra (Parseval: equal to real-space squared errors)."""

from __future__ import annotations

import torch


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
    """cryoAI's symmetric loss per image: min over {image, image rotated by pi}; (B,)."""
    return symmetric_loss_terms(target, prediction, weight).min(dim=-1).values
