"""Reading ahead in a background thread, for loaders without worker processes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class ThreadPrefetcher:
    """Iterate ``loader`` in a background thread, up to ``depth`` batches ahead of the consumer.

    Image files are read with ``os.pread``, which releases the GIL: the next batches are read
    while the current step computes, without the start-up, memory and CPU cost of worker
    processes. Batches come in the loader's order; an exception raised while reading is raised
    in the consumer at the batch where it happened. Stopping early (``break``, an exception in
    the consumer) stops the thread before the iterator returns.

    Parameters
    ----------
    loader : any iterable of batches (e.g. a DataLoader with ``num_workers=0``); ``len()`` and
        ``.dataset`` are passed through.
    depth : batches read ahead (at least 1).
    """

    _POLL_S = 0.1

    def __init__(self, loader: Iterable, depth: int = 2):
        self.loader = loader
        self.depth = max(1, int(depth))

    @property
    def dataset(self):
        """The wrapped loader's dataset."""
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    slots.put(item, timeout=self._POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.loader:
                    if not put(("batch", batch)):
                        return
                put(("end", None))
            except BaseException as exc:  # handed to the consumer, raised there
                put(("error", exc))

        thread = threading.Thread(target=produce, name="cryoai-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = slots.get()
                if kind == "batch":
                    yield item
                elif kind == "end":
                    return
                else:
                    raise item
        finally:
            stop.set()
            thread.join()
