"""Pose prediction with a trained model over a whole data set (batched, no particle dropped)."""

from __future__ import annotations

import numpy as np
import torch

from ..physics.rotations import in_plane_180
from .losses import symmetric_loss_terms


def encoder_input(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return images if mask is None else images * mask


@torch.no_grad()
def choose_poses(model, batch: dict, mask, *, use_symmetric: bool = True,
                 learn_shifts: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder poses of a batch, resolving heads and the 180-degree ambiguity by the loss.

    Returns rotations (B, 3, 3), shifts_a (B, 2) and the per-image loss (B,).
    """
    images = batch["images"]
    rot, shifts = model.encoder(encoder_input(images, mask))  # (B, H, 3, 3), (B, H, 2)
    if not learn_shifts:
        shifts = torch.zeros_like(shifts)
    b, h = rot.shape[:2]
    target = model.image_spectra(images)
    ctf = model.ctf(batch)
    pred = model.render(rot.reshape(b * h, 3, 3), shifts.reshape(b * h, 2),
                        ctf.repeat_interleave(h, dim=0))
    terms = symmetric_loss_terms(target.repeat_interleave(h, dim=0), pred, model.hermitian_weight)
    terms = terms.reshape(b, h, 2)
    if not use_symmetric:
        terms[..., 1] = float("inf")
    flat = terms.reshape(b, 2 * h)
    best = flat.argmin(dim=-1)
    head, flipped = best // 2, (best % 2).bool()
    ar = torch.arange(b, device=rot.device)
    r, t = rot[ar, head], shifts[ar, head]
    # The rotated image matched pose (R, t): the image itself has pose (R Rz(pi), -t).
    r = torch.where(flipped[:, None, None], in_plane_180(r), r)
    t = torch.where(flipped[:, None], -t, t)
    return r, t, flat[ar, best]


@torch.no_grad()
def predict_poses(model, loader, mask, device, *, use_symmetric: bool = True,
                  learn_shifts: bool = True, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poses for every particle a loader yields.

    Returns rotations (N, 3, 3), shifts_a (N, 2) and losses (N,), in dataset order.
    """
    model.eval()
    n = len(loader.dataset)
    rotations = np.zeros((n, 3, 3))
    shifts = np.zeros((n, 2))
    losses = np.zeros(n)
    seen = np.zeros(n, dtype=bool)
    for batch in loader:
        idx = batch["index"].numpy()
        batch = {k: v.to(device) for k, v in batch.items()}
        r, t, loss = choose_poses(model, batch, mask, use_symmetric=use_symmetric, learn_shifts=learn_shifts)
        rotations[idx] = r.double().cpu().numpy()
        shifts[idx] = t.double().cpu().numpy()
        losses[idx] = loss.double().cpu().numpy()
        seen[idx] = True
        if progress is not None:
            progress(len(idx))
    if not seen.all():
        raise RuntimeError(f"pose prediction missed {int((~seen).sum())} particles")
    return rotations, shifts, losses
