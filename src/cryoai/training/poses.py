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


def iter_poses(model, loader, mask, device, *, use_symmetric: bool = True, learn_shifts: bool = True,
               progress=None):
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
            idx = batch["index"].numpy()
            if len(idx) == 0:
                continue
            if idx[0] != expected or (len(idx) > 1 and (np.diff(idx) != 1).any()):
                raise RuntimeError(f"pose prediction expected particle {expected} next, got {idx[0]}")
            expected += len(idx)
            batch = {k: v.to(device) for k, v in batch.items()}
            r, t, loss = choose_poses(model, batch, mask, use_symmetric=use_symmetric,
                                      learn_shifts=learn_shifts)
            yield (r.float().cpu().numpy(), t.float().cpu().numpy(), loss.float().cpu().numpy())
            if progress is not None:
                progress(len(idx))
    if expected != len(loader.dataset):
        raise RuntimeError(f"pose prediction missed {len(loader.dataset) - expected} particles")


def predict_poses(model, loader, mask, device, *, use_symmetric: bool = True,
                  learn_shifts: bool = True, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poses for every particle of a loader in order (:func:`iter_poses`, gathered).

    Returns rotations (N, 3, 3), shifts_a (N, 2) and losses (N,), float32, in dataset order.
    """
    parts = list(iter_poses(model, loader, mask, device, use_symmetric=use_symmetric,
                            learn_shifts=learn_shifts, progress=progress))
    if not parts:
        return np.zeros((0, 3, 3), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
