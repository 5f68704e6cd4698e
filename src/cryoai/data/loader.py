"""Mini-batches of an epoch, and the loader that reads them ahead of the step."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Sampler

from .dataset import ParticleBatch
from .prefetch import ThreadPrefetcher


def _whole_batch(batch: ParticleBatch) -> ParticleBatch:
    """The DataLoader's collate: the dataset already returns whole batches."""
    return batch


class EpochBatches(Sampler):
    """The mini-batches of one epoch: a permutation of the particles drawn from ``seed``, cut
    into global batches of ``batch_size``, starting at batch ``start`` (to resume mid-epoch
    without reading the skipped images). With ``world_size`` > 1 each rank takes every
    ``world_size``-th particle of each global batch (its shard of that batch).

    Parameters
    ----------
    n : number of particles.
    batch_size : global batch size (all ranks together).
    seed : seed of the permutation (None: the particles in order).
    start : index of the first batch to yield.
    rank, world_size : this process's rank and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int | None, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)

    def __iter__(self):
        n_batches = math.ceil(self.n / self.batch_size)
        if self.seed is None:  # in order: nothing to hold
            for b in range(self.start, n_batches):
                stop = min((b + 1) * self.batch_size, self.n)
                yield list(range(b * self.batch_size + self.rank, stop, self.world_size))
            return
        # int32 (4 bytes per particle) gives the same permutation as the default int64
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed),
                               dtype=torch.int32)
        for b in range(self.start, n_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank::self.world_size].tolist()


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                start: int = 0, rank: int = 0, world_size: int = 1,
                prefetch: int = 2) -> DataLoader | ThreadPrefetcher:
    """A DataLoader over :class:`EpochBatches` that reads whole batches at once
    (:meth:`ParticleDataset.read`), reading ahead: with ``num_workers`` background processes (4 batches
    each), or, with ``num_workers=0``, in one background thread ``prefetch`` batches ahead
    (:class:`cryoai.data.prefetch.ThreadPrefetcher`; ``prefetch=0``: no read-ahead).
    """
    sampler = EpochBatches(len(dataset), batch_size, seed=seed if shuffle else None, start=start,
                           rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_whole_batch,
                        num_workers=num_workers, persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    if num_workers == 0 and prefetch > 0:
        return ThreadPrefetcher(loader, depth=prefetch)
    return loader
