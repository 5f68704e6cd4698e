"""Data-parallel training over several processes with torch.distributed.

``cryoai train`` started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous address) runs one process per rank: gloo on CPU, NCCL on CUDA (each rank
on GPU ``LOCAL_RANK``). Every rank builds the same model from the same seed, reads its own
shard of each global mini-batch (see :class:`cryoai.data.loader.EpochBatches`), and
DistributedDataParallel averages the gradients; rank 0 alone writes outputs and checkpoints.
Decisions that must be the same on every rank (stop for time or SIGINT, a diverged loss) are
all-reduced.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..reconstruction.shard import Shard


@dataclass(frozen=True)
class DistInfo:
    """The place of this process in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment of a torchrun (or SLURM + torchrun) worker is present."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device | None = None) -> tuple[DistInfo, torch.device | None]:
    """Join the process group that torchrun set up (no-op for a single process).

    Parameters
    ----------
    device : the requested device; for CUDA each rank takes GPU ``LOCAL_RANK``.

    Returns
    -------
    (DistInfo, device for this rank).
    """
    if not launched_by_torchrun():
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # Long enough for rank 0 to write the outputs of a large run (the poses of every
        # particle) while the other ranks wait at the final barrier.
        minutes = float(os.environ.get("CRYOAI_DIST_TIMEOUT_MIN", "240"))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    return DistInfo(rank, world, local), device


def shutdown() -> None:
    """Leave the process group (if joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_flag(flag: bool, info: DistInfo, device: torch.device, op) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item() > 0.5)


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank."""
    return _reduce_flag(flag, info, device, dist.ReduceOp.MIN)


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank."""
    return _reduce_flag(flag, info, device, dist.ReduceOp.MAX)


def weighted_mean(value: float, weight: float, info: DistInfo, device: torch.device) -> float:
    """The mean of ``value`` over all ranks, weighted by ``weight`` (e.g. the batch shard size)."""
    if not info.enabled:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else value


def broadcast_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's (returns it). CPU tensors go through the
    GPU when the backend is NCCL.
    """
    if not info.enabled:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        tmp = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(tmp, src=0)
        tensor.copy_(tmp.to(tensor.device))
    else:
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Replace ``tensor`` in place by its sum over the ranks (returns it); CPU tensors go
    through the GPU when the backend is NCCL. Complex tensors are summed as their real pairs.
    """
    if not info.enabled:
        return tensor
    work = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        tmp = work.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp)
        work.copy_(tmp.to(work.device))
    else:
        dist.all_reduce(work)
    return tensor


def particle_shard(info: DistInfo) -> Shard:
    """The rank's :class:`cryoai.reconstruction.shard.Shard` of the stages that visit every
    particle (the assignment, the reconstruction's sums), summed over the ranks by all-reduce.
    """
    if not info.enabled:
        return Shard()
    return Shard(info.rank, info.world_size, lambda t: all_reduce_sum_(t, info))


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


class _LossModule(torch.nn.Module):
    """A loss as a module, so that DistributedDataParallel can wrap it: its forward is
    ``loss(batch)`` and its parameters are ``model``'s.
    """

    def __init__(self, model: torch.nn.Module, loss):
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch) -> torch.Tensor:
        if len(batch) == 0:
            # This rank's shard of a short last batch is empty: a zero loss that still touches
            # every parameter, so that the gradient all-reduce sees the same set on every rank.
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        return self._loss(batch)


def data_parallel_loss(model: torch.nn.Module, loss, device: torch.device, *,
                       find_unused_parameters: bool) -> torch.nn.Module:
    """``loss(batch)`` wrapped in DistributedDataParallel over ``model``'s parameters: calling
    it computes this rank's loss, and its backward averages the gradients over the ranks.

    On CUDA the BatchNorms of ``model`` become SyncBatchNorm (statistics over the global
    batch); on CPU each rank normalises over its own shard, as plain DDP does.
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(_LossModule(model, loss),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)
