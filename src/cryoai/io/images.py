"""Lazy access to the particle images of a :class:`ParticleTable` (only the images asked for
are read, with ``pread``; see :class:`cryoai.io.mrc.StackReader`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from cryoai.errors import InputError

from .mrc import StackReader, check_finite, check_not_blank, check_stack_box, read_header
from .particles import ParticleTable


def _missing_message(path: str, source_path: str | None, n_missing: int) -> str:
    src = f" (referenced by {source_path})" if source_path else ""
    more = f"; {n_missing - 1} more stack(s) missing" if n_missing > 1 else ""
    return (f"{path}: image stack not found{src}{more}; relative names are looked up from the current "
            "folder (run from the project folder), then beside the particle file; or pass datadir= "
            "(or --datadir) to point at the stacks")


def resolve_stacks(table: ParticleTable) -> list[str]:
    """The distinct stack files of ``table``, checking that they exist.

    Returns
    -------
    list of str, ``table.stack_files``.

    Raises
    ------
    InputError
        Naming the first missing stack.
    """
    stacks = list(table.stack_files)
    missing = [s for s in stacks if not os.path.isfile(s)]
    if missing:
        raise InputError(_missing_message(missing[0], table.source_path, len(missing)))
    return stacks


def validate_images(table: ParticleTable) -> None:
    """Check, from the stack headers only, that every image of ``table`` can be read.

    Each distinct stack must exist, be a readable MRC file with square, even images of
    ``table.box_px`` pixels, and hold more images than the largest index that refers to it.

    Raises
    ------
    InputError
        One line naming the stack and the problem.
    """
    resolve_stacks(table)
    _validate(list(table.stack_files), table.stack_ids, table.stack_indices, table.box_px,
              table.source_path)


def _validate(stacks: list[str], sid: np.ndarray, image_index: np.ndarray, box: int,
              source_path: str | None) -> None:
    if box % 2:
        raise InputError(f"{source_path}: box size {box} is odd; cryoai needs even boxes")
    missing = [s for s in stacks if not os.path.isfile(s)]
    if missing:
        raise InputError(_missing_message(missing[0], source_path, len(missing)))
    max_index = np.full(len(stacks), -1, dtype=np.int64)
    np.maximum.at(max_index, sid, image_index)
    for s, top in zip(stacks, max_index, strict=True):
        if top < 0:
            continue
        info = read_header(s)
        check_stack_box(info, box)
        if top >= info.n_images:
            raise InputError(f"{s}: the particle metadata refer to image {top + 1} (1-based) but "
                             f"the stack has {info.n_images} images")


class ImageSource:
    """Read particle images lazily from their stacks.

    Each distinct stack is opened on first use and kept open (up to ``max_open`` stacks, least
    recently used closed first); only the requested images are read from disk, with explicit
    reads rather than a memory map, so that the process's resident memory does not grow with
    the amount of data read. The object pickles without its open files (DataLoader workers
    reopen them).

    Parameters
    ----------
    table : the particles; ``read(i)`` returns the image of row ``i``.
    max_open : largest number of stacks kept mapped at once (each holds a file descriptor).
    check_finite : raise :class:`InputError` when a read image holds NaN/inf.
    check_blank : raise :class:`InputError` when a read image is blank (all pixels equal).
    """

    def __init__(self, table: ParticleTable, *, max_open: int = 128, check_finite: bool = True,
                 check_blank: bool = True):
        self.box = int(table.box_px)
        self.source_path = table.source_path
        self.stacks = list(table.stack_files)
        self._stack_id = table.stack_ids  # (shared with the table, not copied)
        self._image_index = table.stack_indices
        self.max_open = max(1, int(max_open))
        self.check_finite = check_finite
        self.check_blank = check_blank
        self._maps: OrderedDict[int, StackReader] = OrderedDict()
        self._lock = threading.Lock()  # reads may come from a prefetch thread and the main one

    def __len__(self) -> int:
        return len(self._stack_id)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n particles, N, N)."""
        return (len(self), self.box, self.box)

    # -- pickling: paths only, maps reopened lazily
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _map(self, sid: int) -> StackReader:
        m = self._maps.get(sid)
        if m is not None:
            self._maps.move_to_end(sid)
            return m
        path = self.stacks[sid]
        if not os.path.isfile(path):
            n_missing = sum(not os.path.isfile(s) for s in self.stacks)
            raise InputError(_missing_message(path, self.source_path, n_missing))
        info = read_header(path)
        check_stack_box(info, self.box)
        m = StackReader(info)
        self._maps[sid] = m
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)[1].close()
        return m

    def read(self, indices) -> np.ndarray:
        """Images of the particles ``indices``.

        Parameters
        ----------
        indices : (k,) particle (row) indices, any order, repeats allowed.

        Returns
        -------
        (k, N, N) float32, in the order of ``indices``.

        Raises
        ------
        IndexError
            A particle index outside the table.
        InputError
            A missing stack, an image index past the end of its stack, NaN/inf pixels, a blank image.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        idx = np.where(idx < 0, idx + n, idx)
        with self._lock:  # the open-stack cache is shared: one reader at a time
            return self._read(idx)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        sids = self._stack_id[idx]
        order = np.argsort(sids, kind="stable")
        bounds = np.flatnonzero(np.diff(sids[order])) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            sid = int(sids[group[0]])
            stack = self._map(sid)
            rows = self._image_index[idx[group]]
            if rows.max() >= stack.shape[0]:
                raise InputError(f"{self.stacks[sid]}: the particle metadata refer to image "
                                 f"{int(rows.max()) + 1} (1-based) but the stack has "
                                 f"{stack.shape[0]} images")
            block = stack.read(rows)
            if self.check_finite:
                check_finite(block, self.stacks[sid], rows)
            if self.check_blank:
                check_not_blank(block, self.stacks[sid], rows)
            out[group] = block
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        """The image of particle ``index``, (N, N) float32."""
        return self.read([index])[0]

    def validate(self) -> None:
        """:func:`validate_images` for this table (stacks exist, indices in range, box)."""
        _validate(self.stacks, self._stack_id, self._image_index, self.box, self.source_path)

    def close(self) -> None:
        """Drop the open maps (they are reopened on the next read)."""
        with self._lock:
            self._maps.clear()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
