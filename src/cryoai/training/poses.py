"""Pose prediction with a trained encoder over a whole data set (batched, no particle dropped)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.dataset import ParticleBatch
from ..models.cryoai import CryoAI
from ..physics.rotations import in_plane_180
from .losses import pose_loss_terms


def encoder_input(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The encoder's input: the images times the circular mask (if any)."""
    return images if mask is None else images * mask


def encoder_hypotheses(model: CryoAI, images: torch.Tensor, mask: torch.Tensor | None, *,
                       learn_shifts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's pose hypotheses: rotations (B, H, 3, 3) and shifts_a (B, H, 2) (zero
    unless ``learn_shifts``).
    """
    rot, shifts = model.encoder(encoder_input(images, mask))
    if not learn_shifts:
        shifts = torch.zeros_like(shifts)
    return rot, shifts


@torch.no_grad()
def choose_poses(model: CryoAI, batch: ParticleBatch, mask, *, use_symmetric: bool = True,
                 learn_shifts: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder poses of a batch, the head and the 180-degree ambiguity resolved by the loss
    (:func:`cryoai.training.losses.pose_loss_terms`, argmin).

    Returns rotations (B, 3, 3), shifts_a (B, 2) and the per-image loss (B,).
    """
    formation = model.formation
    rot, shifts = encoder_hypotheses(model, batch.images, mask, learn_shifts=learn_shifts)
    terms = pose_loss_terms(formation, model.decoder, formation.spectra(batch.images),
                            formation.ctf(batch), rot, shifts, symmetric=use_symmetric)
    b, h, k = terms.shape
    flat = terms.reshape(b, h * k)
    best = flat.argmin(dim=-1)
    head, flipped = best // k, (best % k).bool()
    ar = torch.arange(b, device=rot.device)
    r, t = rot[ar, head], shifts[ar, head]
    # The rotated image matched pose (R, t): the image itself has pose (R Rz(pi), -t).
    r = torch.where(flipped[:, None, None], in_plane_180(r), r)
    t = torch.where(flipped[:, None], -t, t)
    return r, t, flat[ar, best]


def iter_poses(model: CryoAI, loader, mask, device, *, use_symmetric: bool = True,
               learn_shifts: bool = True, progress=None):
    """Poses of the particles of a loader that yields them in order (``shuffle=False``), one
    batch at a time.

    Yields
    ------
    (rotations (B, 3, 3) float32, shifts_a (B, 2) float32, losses (B,) float32) numpy arrays.

    Raises
    ------
    RuntimeError
        The loader skipped or reordered particles.
    """
    model.eval()
    expected = 0
    with torch.no_grad():
        for batch in loader:
            idx = batch.index.numpy()
            if len(idx) == 0:
                continue
            if idx[0] != expected or (len(idx) > 1 and (np.diff(idx) != 1).any()):
                raise RuntimeError(f"pose prediction expected particle {expected} next, got {idx[0]}")
            expected += len(idx)
            r, t, loss = choose_poses(model, batch.to(device), mask, use_symmetric=use_symmetric,
                                      learn_shifts=learn_shifts)
            yield (r.float().cpu().numpy(), t.float().cpu().numpy(), loss.float().cpu().numpy())
            if progress is not None:
                progress(len(idx))
    if expected != len(loader.dataset):
        raise RuntimeError(f"pose prediction missed {len(loader.dataset) - expected} particles")
