"""A process's share of the stages whose cost grows with the number of particles.

Under torchrun every rank runs the default run; the stages that visit every particle (the
assignment against the search's map, the reconstruction's back-projected sums) split the
particles between the ranks instead of each doing all of them: each rank takes one contiguous
block of the rows, and the per-particle results or the sums are added over the ranks (an
all-reduce), so that every rank ends with what one process would have computed (up to the order
of floating-point sums). This module holds the split only; the sum over processes is given by
the caller (:func:`cryoai.training.distributed.particle_shard`), so that the mechanisms here
need no process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shard:
    """A process's place among ``size`` processes, and the in-place sum over them.

    Attributes
    ----------
    rank, size : this process's index and the number of processes (1: all rows here).
    reduce : ``reduce(tensor)`` replaces ``tensor`` in place by its sum over the processes;
        None with one process.
    """

    rank: int = 0
    size: int = 1
    reduce: Callable[[torch.Tensor], None] | None = None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The process's contiguous block of ``rows`` (all of them with one process)."""
        if self.size <= 1:
            return rows
        return np.array_split(np.asarray(rows), self.size)[self.rank]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place (unchanged with one process)."""
        if self.size > 1 and self.reduce is not None:
            self.reduce(tensor)
        return tensor


#: One process: every row here, nothing to add.
ALONE = Shard()

__all__ = ["ALONE", "Shard"]
