"""MRC volumes and image stacks (``.mrc``, ``.mrcs``), read memory-mapped and written atomically.

Arrays follow mrcfile's order: volumes ``(N, N, N)`` indexed ``[z, y, x]``, stacks
``(n, N, N)`` indexed ``[image, y, x]``. Voxel and pixel sizes are in Angstrom.

Headers are parsed by ``mrcfile`` in strict mode. Files without the ``MAP`` identifier (some
older writers, e.g. the RELION-extracted stack in cryoDRGN's test data) are accepted only when
their header is self-consistent: a known data mode, positive sizes and a file size that matches
the header exactly. Data blocks are then mapped with :class:`numpy.memmap` (read-only), so a
stack of millions of images is never loaded whole.

Image stacks are written as MRC2014 image stacks: ``ispg = 0``, ``nz`` = number of images,
``mz = 1`` (what ``mrcfile``'s ``set_image_stack`` writes), cell ``(N, N, 1) * pixel size``.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryoai.errors import InputError

from ._util import atomic_path, one_line, require_file

#: MRC data modes that cryoai reads, and their numpy types.
SUPPORTED_MODES: dict[int, str] = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
_UNSUPPORTED_MODES: dict[int, str] = {
    3: "complex int16",
    4: "complex float32",
    101: "packed 4-bit integers",
}
_HEADER_BYTES = 1024


@dataclass(frozen=True)
class MrcInfo:
    """What an MRC header says about the data block.

    Attributes
    ----------
    path : str, the file.
    shape : (nz, ny, nx) of the data block (a stack: (n images, N, N)).
    dtype : numpy dtype of the stored values (with the file's byte order).
    data_offset : int, byte offset of the data block (1024 + extended header).
    voxel_size_a : (x, y, z) voxel size in Angstrom, 0 where the header leaves it unset.
    ispg : int, space group (0 for image stacks, 1 for volumes, by convention).
    """

    path: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    data_offset: int
    voxel_size_a: tuple[float, float, float]
    ispg: int

    @property
    def n_images(self) -> int:
        """Number of images (``nz``) when the file is read as a stack."""
        return self.shape[0]

    @property
    def box(self) -> int:
        """Image width ``nx`` in pixels."""
        return self.shape[2]


def read_header(path: str | os.PathLike) -> MrcInfo:
    """Parse and check the header of an MRC file, without reading its data.

    Parameters
    ----------
    path : the ``.mrc``/``.mrcs`` file.

    Returns
    -------
    :class:`MrcInfo`.

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported (e.g. complex) data mode, or a file shorter
        than its header says (truncated).
    """
    p = require_file(path, "MRC file")
    size = p.stat().st_size
    if size < _HEADER_BYTES:
        raise InputError(f"{p}: not an MRC file ({size} bytes, shorter than the 1024-byte header)")
    strict = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mrc = mrcfile.open(p, mode="r", header_only=True, permissive=False)
        except ValueError as exc:
            msg = str(exc)
            if "Map ID string not found" not in msg and "machine stamp" not in msg:
                raise InputError(f"{p}: not a valid MRC file ({one_line(msg)})") from exc
            strict = False
            mrc = mrcfile.open(p, mode="r", header_only=True, permissive=True)
        except OSError as exc:
            raise InputError(f"{p}: cannot read ({one_line(exc.strerror or exc)})") from exc
    with mrc:
        h = mrc.header
        mode = int(h.mode)
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        nsymbt = int(h.nsymbt)
        byteorder = h.mode.dtype.byteorder
        mx, my, mz = int(h.mx), int(h.my), int(h.mz)
        cella = (float(h.cella.x), float(h.cella.y), float(h.cella.z))
        ispg = int(h.ispg)

    not_mrc = f"{p}: not an MRC file (no 'MAP ' identifier and the header is not valid)"
    if mode in _UNSUPPORTED_MODES:
        if not strict:
            raise InputError(not_mrc)
        raise InputError(f"{p}: unsupported MRC mode {mode} ({_UNSUPPORTED_MODES[mode]}); "
                         "cryoai reads real-valued modes 0, 1, 2, 6, 12")
    if mode not in SUPPORTED_MODES:
        if not strict:
            raise InputError(not_mrc)
        raise InputError(f"{p}: unknown MRC mode {mode}; cryoai reads modes 0, 1, 2, 6, 12")
    if min(nx, ny, nz) <= 0 or nsymbt < 0:
        if not strict:
            raise InputError(not_mrc)
        raise InputError(f"{p}: invalid MRC header (size {nx} x {ny} x {nz}, "
                         f"extended header {nsymbt} bytes)")
    dtype = np.dtype(SUPPORTED_MODES[mode]).newbyteorder(byteorder)
    offset = _HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if not strict and size != expected:
        raise InputError(not_mrc)
    if size < expected:
        raise InputError(
            f"{p}: truncated MRC file (header says {nz} x {ny} x {nx} values of mode {mode}, "
            f"{expected} bytes in all; the file has {size})"
        )
    voxel = tuple(c / m if m > 0 else 0.0 for c, m in zip(cella, (mx, my, mz), strict=True))
    return MrcInfo(str(p), (nz, ny, nx), dtype, offset, voxel, ispg)  # type: ignore[arg-type]


def check_finite(images: np.ndarray, path: str | os.PathLike, indices=None) -> None:
    """Raise :class:`InputError` if ``images`` hold NaN or infinite values.

    Parameters
    ----------
    images : array of any shape, e.g. (k, N, N), as just read from ``path``.
    path : the file the values came from (named in the message).
    indices : optional (k,) indices of the images in the file, to name the first bad one.
    """
    if images.dtype.kind != "f" or np.isfinite(images).all():
        return
    where = ""
    if images.ndim >= 3:
        bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
        first = int(np.argmax(bad))
        pos = int(indices[first]) if indices is not None else first
        where = (f" (image {pos + 1}, 1-based as in rlnImageName; {int(bad.sum())} such image(s) "
                 "in this read)")
    raise InputError(f"{path}: image data contain NaN or infinite values{where}")


def check_not_blank(images: np.ndarray, path: str | os.PathLike, indices=None) -> None:
    """Raise :class:`InputError` if an image of ``images`` is blank (every pixel equal).

    Parameters
    ----------
    images : (k, N, N) images as just read from ``path``.
    path : the file the values came from (named in the message).
    indices : optional (k,) 0-based indices of the images in the file.
    """
    if images.ndim < 3 or images.shape[0] == 0:
        return
    flat = images.reshape(images.shape[0], -1)
    blank = flat.min(axis=1) == flat.max(axis=1)
    if not blank.any():
        return
    first = int(np.argmax(blank))
    pos = int(indices[first]) if indices is not None else first
    raise InputError(f"{path}: image {pos + 1} (1-based, as in rlnImageName) is blank (every pixel is "
                     f"{float(flat[first, 0]):g}); {int(blank.sum())} blank image(s) in this read")


def _memmap(info: MrcInfo) -> np.memmap:
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.data_offset,
                     shape=info.shape)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic map.

    Parameters
    ----------
    path : ``.mrc`` file.

    Returns
    -------
    volume : (N, N, N) float32, indexed ``[z, y, x]`` (odd N is returned as is; callers that
        need an even box crop it).
    voxel_size_a : float, Angstrom per voxel from the header; 0.0 where the header leaves it
        unset (e.g. ASPIRE's 70S map).

    Raises
    ------
    InputError
        As :func:`read_header`; also for a non-cubic map, anisotropic voxels or NaN/inf values.
    """
    info = read_header(path)
    nz, ny, nx = info.shape
    if not nx == ny == nz:
        raise InputError(f"{info.path}: map is {nx} x {ny} x {nz} voxels, cryoai needs a cube")
    vx, vy, vz = info.voxel_size_a
    set_sizes = [v for v in (vx, vy, vz) if v > 0]
    if set_sizes and (max(set_sizes) - min(set_sizes)) > 1e-3 * max(set_sizes):
        raise InputError(f"{info.path}: anisotropic voxel size {vx:g} x {vy:g} x {vz:g} A")
    data = _memmap(info)
    volume = np.array(data, dtype=np.float32)
    del data
    check_finite(volume, info.path)
    return volume, float(vx)


def write_volume(path: str | os.PathLike, volume: np.ndarray, voxel_size_a: float) -> None:
    """Write a map (float32, mode 2) atomically, keeping the voxel size in the header.

    Parameters
    ----------
    path : output ``.mrc`` file (replaced if it exists).
    volume : (N, N, N) array indexed ``[z, y, x]``.
    voxel_size_a : Angstrom per voxel (> 0).
    """
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D (N, N, N), got shape {vol.shape}")
    if not voxel_size_a > 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size_a}")
    with atomic_path(path, suffix=".mrc") as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(vol)
            mrc.set_volume()
            mrc.voxel_size = float(voxel_size_a)


def open_stack(path: str | os.PathLike) -> np.memmap:
    """Memory-map an image stack read-only.

    Parameters
    ----------
    path : ``.mrcs`` (or ``.mrc``) stack; a single 2D image reads as a stack of one.

    Returns
    -------
    (n, N, N) read-only :class:`numpy.memmap` in the file's dtype, indexed ``[image, y, x]``.
    Index it to read images (converting to float32 and :func:`check_finite` are the caller's;
    :func:`read_stack_images` does both).

    Raises
    ------
    InputError
        As :func:`read_header`; also for non-square images or an odd box size.
    """
    info = read_header(path)
    check_stack_box(info)
    return _memmap(info)


def check_stack_box(info: MrcInfo, expected_box: int | None = None) -> None:
    """Raise :class:`InputError` unless the images of ``info`` are square, even-sized and (when
    given) ``expected_box`` pixels wide.
    """
    _, ny, nx = info.shape
    if nx != ny:
        raise InputError(f"{info.path}: images are {nx} x {ny} pixels, cryoai needs square images")
    if nx % 2:
        raise InputError(f"{info.path}: box size {nx} is odd; cryoai needs even boxes")
    if expected_box is not None and nx != expected_box:
        raise InputError(f"{info.path}: images are {nx} x {nx} pixels, but the particle "
                         f"metadata say {expected_box}")


def read_stack_images(path: str | os.PathLike, indices=None) -> np.ndarray:
    """Read some images of a stack.

    Parameters
    ----------
    path : the stack.
    indices : (k,) 0-based image indices, any order, repeats allowed; None for all images.

    Returns
    -------
    (k, N, N) float32, in the order of ``indices``.

    Raises
    ------
    InputError
        As :func:`open_stack`; also for an index past the end and NaN/inf pixels.
    """
    stack = open_stack(path)
    n = stack.shape[0]
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise InputError(f"{path}: image index {bad} (0-based) is out of range; "
                         f"the stack has {n} images")
    out = read_rows(stack, idx)
    del stack
    check_finite(out, path, idx)
    return out


#: Reads of at least this many separate runs of images are issued from a thread pool.
_PARALLEL_MIN_RUNS = 4
#: Reads kept in flight at once (``os.pread`` releases the GIL: disk latency overlaps).
READ_THREADS = 8
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _read_pool() -> ThreadPoolExecutor:
    """Return this process's read pool (a pool inherited through ``fork`` has no threads: remade)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cryoai-read"))
    return _POOL[1]


class StackReader:
    """Read images of an MRC stack with ``os.pread`` (no memory map).

    Pages of a memory-mapped file that have been read stay mapped into the process and count
    in its resident memory; over a long run that reads a whole 16 GB data set, a memory map
    makes the resident size grow to the data set's size. Explicit reads keep it flat (the
    kernel's page cache still caches the file, outside the process). Runs of consecutive
    images are read with one call.

    Parameters
    ----------
    info : the stack's header (:func:`read_header`).
    """

    def __init__(self, info: MrcInfo):
        self.info = info
        self.shape = info.shape
        self._row_bytes = int(np.prod(info.shape[1:])) * info.dtype.itemsize
        self._fd = os.open(info.path, os.O_RDONLY)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images ``rows`` (k,) int64 in range, as (k, ny, nx) float32 in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, *self.shape[1:]), dtype=np.float32)
        if rows.size == 0:
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        uniq, first = np.unique(sorted_rows, return_index=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        values = np.empty((uniq.size, *self.shape[1:]), dtype=self.info.dtype)
        flat = values.reshape(uniq.size, -1).view(np.uint8).reshape(uniq.size, self._row_bytes)
        run_starts = np.concatenate([[0], breaks])
        run_counts = np.diff(np.concatenate([run_starts, [uniq.size]]))
        runs = [(int(i0), int(uniq[i0]), int(c)) for i0, c in zip(run_starts, run_counts, strict=True)]
        if len(runs) >= _PARALLEL_MIN_RUNS:  # random access: keep several reads in flight
            list(_read_pool().map(lambda run: self._read_run(flat, *run), runs))
        else:
            for run in runs:
                self._read_run(flat, *run)
        pos = np.searchsorted(uniq, sorted_rows)
        out[order] = values[pos]
        return out

    def _read_run(self, flat: np.ndarray, i0: int, start: int, count: int) -> None:
        """Read ``count`` consecutive images from image ``start`` into rows ``i0..`` of ``flat``."""
        want = count * self._row_bytes
        offset = self.info.data_offset + start * self._row_bytes
        target = flat[i0:i0 + count]
        if hasattr(os, "preadv"):  # straight into the array, no intermediate bytes
            got = os.preadv(self._fd, [memoryview(target).cast("B")], offset)
        else:
            buf = os.pread(self._fd, want, offset)
            got = len(buf)
            target.reshape(-1)[:got] = np.frombuffer(buf, dtype=np.uint8)
        if got != want:
            raise InputError(f"{self.info.path}: truncated MRC file (could not read image "
                             f"{start + got // self._row_bytes + 1})")

    def close(self) -> None:
        """Close the file (reads after this fail)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def read_rows(stack: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``stack[idx]`` as float32, reading the rows in file order (``idx`` int64, in range)."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((idx.size, *stack.shape[1:]), dtype=np.float32)
    out[order] = stack[idx[order]]
    return out


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_a: float) -> None:
    """Write a whole image stack atomically (float32, MRC2014 image stack).

    Parameters
    ----------
    path : output ``.mrcs``.
    images : (n, N, N) array indexed ``[image, y, x]``.
    pixel_size_a : Angstrom per pixel.
    """
    imgs = np.asarray(images)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must have shape (n, N, N), got {imgs.shape}")
    with StackWriter(path, imgs.shape[0], imgs.shape[1], pixel_size_a) as writer:
        writer.write(0, imgs)


class StackWriter:
    """Stream an image stack to disk in chunks.

    The file is preallocated (``mrcfile.new_mmap``) under a temporary name in the output
    directory and moved onto ``path`` by :meth:`close` once every image has been written; an
    exception inside a ``with`` block, or :meth:`abort`, removes the temporary file instead.

    Parameters
    ----------
    path : output ``.mrcs``.
    n_images : number of images n.
    box : image size N (even).
    pixel_size_a : Angstrom per pixel (> 0).
    float16 : store half-precision values (MRC mode 12, as RELION writes by default); values
        beyond float16's range (65504) are refused.

    Examples
    --------
    >>> with StackWriter("out.mrcs", 1000, 64, 5.0) as w:  # doctest: +SKIP
    ...     for start in range(0, 1000, 100):
    ...         w.write(start, make_images(start, 100))  # (100, 64, 64)
    """

    def __init__(self, path: str | os.PathLike, n_images: int, box: int, pixel_size_a: float, *,
                 float16: bool = False):
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        if box < 2 or box % 2:
            raise ValueError(f"box must be even and >= 2, got {box}")
        if not pixel_size_a > 0:
            raise ValueError(f"pixel size must be positive, got {pixel_size_a}")
        self.path = Path(path)
        self.n_images = int(n_images)
        self.box = int(box)
        self.pixel_size_a = float(pixel_size_a)
        self._written = np.zeros(self.n_images, dtype=bool)
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares
        self._ctx = atomic_path(self.path, suffix=".mrcs")
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n_images, self.box, self.box),
                                         mrc_mode=12 if float16 else 2, overwrite=True)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size_a
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._tmp = tmp
        self._bytes_since_remap = 0
        self._open = True

    #: Written pages of a memory map count in the process's resident memory until unmapped;
    #: remapping after this many bytes keeps the writer's footprint bounded for huge stacks.
    REMAP_BYTES = 256 * 1024**2

    def _remap(self) -> None:
        self._mrc.flush()
        self._mrc.close()
        self._mrc = mrcfile.mmap(self._tmp, mode="r+")
        self._bytes_since_remap = 0

    def write(self, start: int, images: np.ndarray) -> None:
        """Write ``images`` ((k, N, N) or (N, N)) at positions ``start .. start + k - 1``."""
        if not self._open:
            raise ValueError(f"{self.path}: writer is closed")
        imgs = np.asarray(images, dtype=np.float32)
        if imgs.ndim == 2:
            imgs = imgs[None]
        if imgs.ndim != 3 or imgs.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must have shape (k, {self.box}, {self.box}), "
                             f"got {np.shape(images)}")
        k = imgs.shape[0]
        if start < 0 or start + k > self.n_images:
            raise ValueError(f"images {start}..{start + k - 1} are outside the stack of "
                             f"{self.n_images}")
        if not np.isfinite(imgs).all():
            raise ValueError(f"{self.path}: refusing to write NaN or infinite pixel values")
        if k == 0:
            return
        if self._mrc.data.dtype == np.float16:
            if np.abs(imgs).max() > np.finfo(np.float16).max:
                raise ValueError(f"{self.path}: pixel values beyond float16's range (65504)")
            imgs = imgs.astype(np.float16)
        self._mrc.data[start:start + k] = imgs
        self._written[start:start + k] = True
        self._bytes_since_remap += imgs.nbytes
        if self._bytes_since_remap >= self.REMAP_BYTES:
            self._remap()
        x = imgs.astype(np.float64)
        self._stats[0] = min(self._stats[0], float(x.min()))
        self._stats[1] = max(self._stats[1], float(x.max()))
        self._stats[2] += float(x.sum())
        self._stats[3] += float((x * x).sum())

    def close(self) -> None:
        """Finish the header and move the file into place.

        Raises
        ------
        ValueError
            If some images were never written (the temporary file is removed).
        """
        if not self._open:
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise ValueError(f"{self.path}: {missing.size} image(s) never written "
                             f"(first index {int(missing[0])}); nothing was saved")
        count = self.n_images * self.box * self.box
        mean = self._stats[2] / count
        h = self._mrc.header
        h.dmin, h.dmax, h.dmean = self._stats[0], self._stats[1], mean
        h.rms = float(np.sqrt(max(self._stats[3] / count - mean * mean, 0.0)))
        self._mrc.close()
        self._open = False
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Discard the partial file."""
        if not self._open:
            return
        self._open = False
        try:
            self._mrc.close()
        finally:
            err = RuntimeError("aborted")
            try:
                self._ctx.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):  # pragma: no cover - safety net only
        if getattr(self, "_open", False):
            self.abort()
