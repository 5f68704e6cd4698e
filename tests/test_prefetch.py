"""The background-thread read-ahead of the training and prediction loaders."""

from __future__ import annotations

import threading
import time

import pytest

from cryoai.data.prefetch import ThreadPrefetcher


class _Source:
    """Batches 0..n-1, each read slowly; fails at ``fail_at``; counts how far it was read."""

    dataset = "the dataset"

    def __init__(self, n: int, fail_at: int | None = None, delay_s: float = 0.0):
        self.n, self.fail_at, self.delay_s = n, fail_at, delay_s
        self.produced = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.delay_s)
            if i == self.fail_at:
                raise ValueError(f"bad batch {i}")
            self.produced += 1
            yield i


def _prefetch_threads() -> int:
    return sum(t.name == "cryoai-prefetch" for t in threading.enumerate())


def test_prefetch_keeps_order_and_passes_len_and_dataset():
    src = _Source(50)
    pre = ThreadPrefetcher(src, depth=3)
    assert len(pre) == 50 and pre.dataset == "the dataset"
    assert list(pre) == list(range(50))
    assert list(pre) == list(range(50))  # iterable again, like a DataLoader
    assert _prefetch_threads() == 0


def test_prefetch_reads_ahead_while_the_consumer_works():
    src = _Source(6)
    it = iter(ThreadPrefetcher(src, depth=2))
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while src.produced < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    # 1 consumed, 2 queued (depth) and 1 read and waiting for a free slot: no further
    assert src.produced == 4, "the thread should read depth (+1 in hand) batches ahead, no more"
    assert list(it) == [1, 2, 3, 4, 5]


def test_prefetch_raises_reading_errors_at_their_batch():
    got = []
    with pytest.raises(ValueError, match="bad batch 3"):
        for b in ThreadPrefetcher(_Source(10, fail_at=3), depth=2):
            got.append(b)
    assert got == [0, 1, 2]
    assert _prefetch_threads() == 0


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    src = _Source(1000, delay_s=0.001)
    for b in ThreadPrefetcher(src, depth=2):
        if b == 5:
            break
    assert _prefetch_threads() == 0
    assert src.produced <= 5 + 1 + 2 + 1  # what was consumed, queued, and in flight
