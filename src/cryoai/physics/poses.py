"""Poses: the rotation and in-plane shift of every particle, the value passed between stages.

The pose search makes them, the reconstruction and the decoder's training read them, the
checkpoint saves them, evaluation compares them, and the STAR/.cs writers write them; they
keep one form throughout (conventions in CONVENTIONS.md: ``R`` maps the image frame to the
volume frame; ``shift_a`` is the translation of the projection in the image, Angstrom).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Poses:
    """Rotations and shifts of N particles (CPU or device tensors, float32).

    Attributes
    ----------
    rotations : (N, 3, 3), image frame -> volume frame.
    shifts_a : (N, 2) ``(sx, sy)`` Angstrom, the translation of the projection in the image.
    scores : optional (N,), how well each pose explains its image (lower is better, e.g. a
        squared error), or None.
    """

    rotations: torch.Tensor
    shifts_a: torch.Tensor
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.rotations = torch.as_tensor(self.rotations, dtype=torch.float32)
        self.shifts_a = torch.as_tensor(self.shifts_a, dtype=torch.float32)
        n = len(self.rotations)
        if self.rotations.shape != (n, 3, 3) or self.shifts_a.shape != (n, 2):
            raise ValueError(f"Poses need rotations (N, 3, 3) and shifts (N, 2), got "
                             f"{tuple(self.rotations.shape)} and {tuple(self.shifts_a.shape)}")
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float32)

    @classmethod
    def from_arrays(cls, rotations, shifts_a=None, scores=None) -> Poses:
        """Poses from array-likes; missing shifts are zero."""
        rotations = torch.as_tensor(np.asarray(rotations), dtype=torch.float32)
        if shifts_a is None:
            shifts_a = torch.zeros(len(rotations), 2)
        return cls(rotations, torch.as_tensor(np.asarray(shifts_a), dtype=torch.float32), scores)

    def __len__(self) -> int:
        return len(self.rotations)

    def select(self, rows) -> Poses:
        """The poses of ``rows`` (indices or a boolean mask), on the same device."""
        rows = torch.as_tensor(rows, device=self.rotations.device)
        return Poses(self.rotations[rows], self.shifts_a[rows],
                     None if self.scores is None else self.scores[rows])

    def to(self, device) -> Poses:
        """The poses on ``device``."""
        return Poses(self.rotations.to(device), self.shifts_a.to(device),
                     None if self.scores is None else self.scores.to(device))

    def chunks(self, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rotations (k, 3, 3), shifts_a (k, 2)) float32 numpy blocks in order, as the STAR and
        .cs writers take them.
        """
        for start in range(0, len(self), size):
            yield (self.rotations[start:start + size].cpu().numpy(),
                   self.shifts_a[start:start + size].cpu().numpy())
