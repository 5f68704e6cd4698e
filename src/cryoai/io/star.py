"""RELION STAR particle files (3.0 single table, 3.1+ optics and particles tables).

Reading maps a STAR file to a :class:`~cryoai.io.particles.ParticleTable` in cryoai's units:

- ``rlnImageName = "000012@Extract/job012/stack.mrcs"`` -> stack index 11 (STAR is 1-based);
  a relative stack name is looked up from the current folder first (RELION writes it relative
  to the project folder), then the STAR file's folder, then the same basename there, then in
  ``datadir`` (a missing stack is reported only when images are read or validated); the name
  as written is kept (``ParticleTable.stack_names``) for the writers;
- ``rlnDefocusU/V`` Angstrom; ``rlnDefocusAngle`` and ``rlnPhaseShift`` degrees -> radians;
  ``rlnCtfBfactor`` A^2 (default 0); ``rlnVoltage`` kV, ``rlnSphericalAberration`` mm,
  ``rlnAmplitudeContrast``, from the particle rows (3.0) or the optics group (3.1);
- pixel size from ``rlnImagePixelSize``, else ``rlnDetectorPixelSize * 1e4 / rlnMagnification``
  (RELION 3.0's definition: detector pixel in um, magnification);
- poses when ``rlnAngleRot``, ``rlnAngleTilt`` and ``rlnAnglePsi`` are all present:
  ``R = Rz(rot) @ Ry(tilt) @ Rz(psi)`` = scipy ``Rotation.from_euler("ZYZ", ..., degrees=True)``
  (:func:`cryoai.physics.rotations.euler_zyz_to_matrix`);
- shifts ``shifts_a = -origin`` from ``rlnOriginXAngst/YAngst``, or ``rlnOriginX/Y`` (pixels,
  RELION 3.0) times the pixel size; zeros when poses exist without origins; None when neither.

Writing (:func:`write_star`, in :mod:`cryoai.io.star_write`) produces RELION 3.1
(``data_optics`` + ``data_particles``), atomically. The labels, the scan of a file's blocks
and the angle convention that both use are in :mod:`cryoai.io.star_format`; this module
re-exports them and the writer, so that ``cryoai.io.star`` names the whole STAR API.

Both directions stream: the particle rows are parsed in chunks into the table's compact
columns (only the columns cryoai uses are parsed), and writing copies the other columns of
the source file's rows chunk by chunk, so that neither holds the text of a million-particle
file in memory. (``starfile``, which reads a whole block into one DataFrame, is used by the
tests as an independent reader.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoai.errors import InputError

from ._util import box_from_first_stack, require_file, resolve_stack_path, star_base_dirs
from .particles import ParticleTable, compact_column
from .star_format import (
    ANGLE_LABELS,
    CHUNK_ROWS,
    CTF_LABELS,
    CTF_STATE_LABELS,
    OPTICS_LEVEL_LABELS,
    ORIGIN_ANGST_LABELS,
    ORIGIN_PX_LABELS,
    StarBlock,
    _pick_blocks,
    euler_deg_to_matrix,
    iter_loop,
    matrix_to_euler_deg,
    read_loop_frame,
    scan_star,
)
from .star_write import STAR_VERSION_LINE, WRITE_CHUNK_ROWS, write_star

__all__ = [
    "ANGLE_LABELS",
    "CHUNK_ROWS",
    "CTF_LABELS",
    "CTF_STATE_LABELS",
    "OPTICS_LEVEL_LABELS",
    "ORIGIN_ANGST_LABELS",
    "ORIGIN_PX_LABELS",
    "STAR_VERSION_LINE",
    "WRITE_CHUNK_ROWS",
    "StarBlock",
    "euler_deg_to_matrix",
    "iter_loop",
    "matrix_to_euler_deg",
    "parse_image_names",
    "read_loop_frame",
    "read_star",
    "read_star_columns",
    "scan_star",
    "write_star",
]


# ----------------------------------------------------------------------------------- reading


def _numeric(p: Path, frame: pd.DataFrame, label: str) -> np.ndarray:
    try:
        values = pd.to_numeric(frame[label], errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{p}: column {label} has non-numeric values") from exc
    if not np.isfinite(values).all():
        raise InputError(f"{p}: column {label} has missing, NaN or infinite values")
    return values


class _Optics:
    """The optics table of a STAR 3.1 file and the lookup of each particle's group."""

    def __init__(self, p: Path, optics: pd.DataFrame | None, particle_labels: list[str]):
        self.p = p
        self.frame = optics
        self.values: dict[str, np.ndarray] = {}
        if optics is None:
            return
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(f"{p}: data_optics has no rlnOpticsGroup column")
        groups = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce")
        if groups.isna().any() or groups.duplicated().any() or (groups != groups.round()).any():
            raise InputError(f"{p}: rlnOpticsGroup in data_optics must be distinct integers")
        self.groups = pd.Index(groups.astype(np.int64))
        if "rlnOpticsGroup" not in particle_labels and len(optics) > 1:
            raise InputError(f"{p}: data_particles has no rlnOpticsGroup column but data_optics "
                             f"has {len(optics)} groups")
        for label in optics.columns:
            if (label in OPTICS_LEVEL_LABELS or label in CTF_STATE_LABELS) and label not in particle_labels:
                self.values[label] = _numeric(p, optics, label)

    def positions(self, chunk: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
        """(row of data_optics, group number) of each particle of ``chunk``; None without optics."""
        if self.frame is None:
            return None
        if "rlnOpticsGroup" not in chunk.columns:
            n = len(chunk)
            return np.zeros(n, dtype=np.int64), np.full(n, self.groups[0], dtype=np.int64)
        g = pd.to_numeric(chunk["rlnOpticsGroup"], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(g) & (g == np.round(g))
        pos = np.full(len(g), -1, dtype=np.int64)
        pos[ok] = self.groups.get_indexer(g[ok].astype(np.int64))
        if (pos < 0).any():
            bad = int(np.argmax(pos < 0))
            what = f"{g[bad]:g}" if ok[bad] else "a non-integer value"
            raise InputError(f"{self.p}: particles use optics group {what}, which is not in "
                             "data_optics")
        return pos, g.astype(np.int64)


class _Columns:
    """The table's columns, allocated once for all rows and filled chunk by chunk (holding
    per-chunk pieces until the end would fragment the heap).
    """

    def __init__(self, n: int):
        self.n = n
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, start: int, values: np.ndarray, dtype=np.float32) -> None:
        values = np.asarray(values)
        arr = self.arrays.get(name)
        if arr is None:
            arr = self.arrays[name] = np.empty((self.n, *values.shape[1:]), dtype=dtype)
        arr[start:start + len(values)] = values

    def has(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name: str) -> np.ndarray:
        return self.arrays.pop(name)


def parse_image_names(p: Path, names, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rlnImageName`` values ``"000012@path"`` into (0-based index, raw path).

    A name without ``@`` refers to the first (only) image of that file. ``first_row`` is the
    0-based row of ``names[0]`` in the file (for messages). Plain Python string operations:
    pandas' string methods would go through pyarrow, whose allocator keeps freed memory.

    Returns
    -------
    (n,) int64 indices and (n,) object array of the raw paths.
    """
    values = [str(v).strip() for v in np.asarray(names, dtype=object)]
    parts = [v.partition("@") for v in values]
    raw_paths = np.array([q[2] if q[1] else q[0] for q in parts], dtype=object)
    numbers = pd.to_numeric(np.array([q[0] if q[1] else "1" for q in parts], dtype=object),
                            errors="coerce").astype(np.float64)
    bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.floor(numbers))
    bad |= np.array([not r for r in raw_paths], dtype=bool)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{p}: bad rlnImageName '{values[row]}' in particle row "
                         f"{first_row + row + 1} (expected NNNNNN@stack.mrcs)")
    return numbers.astype(np.int64) - 1, raw_paths


def read_star(path: str | os.PathLike, datadir: str | os.PathLike | None = None, *,
              read_poses: bool = True, chunk_rows: int = CHUNK_ROWS) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    Parameters
    ----------
    path : ``.star`` file.
    datadir : optional directory where image stacks are looked up when they are not at the
        path written in ``rlnImageName`` from the current folder (the project folder, as
        RELION means it) or from the STAR file's folder, nor next to the STAR.
    read_poses : parse the angles and origins (False: the table has no poses, and the
        columns are not parsed; for training, which does not use them).
    chunk_rows : rows parsed at a time (memory use grows with it, not with the file).

    Returns
    -------
    :class:`ParticleTable` with ``optics`` the original optics table (3.1) and
    ``source_path``/``source_stamp`` set, so that :func:`write_star` can carry the other
    columns over. Image stacks are not opened (except one header when the box size is not
    in the metadata); see :func:`cryoai.io.validate_images`.

    Raises
    ------
    InputError
        Not a STAR file, no particle table, no rlnImageName, missing CTF columns, no or
        non-positive pixel size, mixed or odd box sizes, malformed values, images flagged as
        phase-flipped or CTF-premultiplied (:data:`CTF_STATE_LABELS`).
    """
    p = require_file(path, "STAR file")
    stat = p.stat()
    blocks = scan_star(p)
    block, optics_block = _pick_blocks(p, blocks)
    labels = block.labels
    if "rlnImageName" not in labels:
        raise InputError(f"{p}: no rlnImageName column in the particle table")
    if block.is_loop and block.n_rows == 0:
        raise InputError(f"{p}: the particle table is empty")
    optics_frame = None
    if optics_block is not None:
        optics_frame = read_loop_frame(p, optics_block).reset_index(drop=True)
        if len(optics_frame) == 0:
            optics_frame = None
    optics = _Optics(p, optics_frame, labels)
    available = set(labels) | set(optics.values)
    missing = [label for label in CTF_LABELS if label not in available]
    if missing:
        raise InputError(f"{p}: missing CTF columns {', '.join(missing)}")
    if "rlnImagePixelSize" in available:
        apix_labels: tuple[str, ...] = ("rlnImagePixelSize",)
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= available:
        apix_labels = ("rlnDetectorPixelSize", "rlnMagnification")
    else:
        raise InputError(f"{p}: no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and "
                         "rlnMagnification)")
    has_angles = read_poses and all(label in labels for label in ANGLE_LABELS)
    if read_poses and all(label in labels for label in ORIGIN_ANGST_LABELS):
        origin_labels, origin_in_px = ORIGIN_ANGST_LABELS, False
    elif read_poses and all(label in labels for label in ORIGIN_PX_LABELS):
        origin_labels, origin_in_px = ORIGIN_PX_LABELS, True
    else:
        origin_labels, origin_in_px = (), False
    wanted = {"rlnImageName", "rlnOpticsGroup", *CTF_LABELS, "rlnPhaseShift", "rlnCtfBfactor",
              *apix_labels, "rlnImageSize", "rlnMicrographName", *(ANGLE_LABELS if has_angles else ()),
              *origin_labels, *CTF_STATE_LABELS}

    cols = _Columns(block.n_rows if block.is_loop else 1)
    raw_ids: dict[str, int] = {}
    micrograph_codes: dict[str, int] = {}
    box_sizes: set[float] = set()
    n = 0
    for chunk in iter_loop(p, block, usecols=wanted & set(labels), chunk_rows=chunk_rows):
        first = int(chunk.index[0]) if len(chunk) else 0
        located = optics.positions(chunk)

        def value(label: str, chunk=chunk, located=located) -> np.ndarray:
            if label in chunk.columns:
                return _numeric(p, chunk, label)
            return optics.values[label][located[0]]

        for label, what in CTF_STATE_LABELS.items():
            if label in available and (value(label) != 0).any():
                raise InputError(f"{p}: the images are {what}")
        index, raw = parse_image_names(p, chunk["rlnImageName"], first)
        codes, uniques = pd.factorize(raw)
        ids = np.array([raw_ids.setdefault(str(u), len(raw_ids)) for u in uniques], dtype=np.int32)
        cols.add("stack_ids", first, ids[codes], np.int32)
        cols.add("stack_indices", first, index, np.int32)
        if located is not None:
            cols.add("optics_group", first, located[1], np.int32)
        if "rlnMicrographName" in chunk.columns:
            mic_codes, mic_names = pd.factorize(chunk["rlnMicrographName"].astype(str))
            mic_ids = np.array([micrograph_codes.setdefault(m, len(micrograph_codes)) for m in mic_names],
                               dtype=np.int32)
            cols.add("micrograph_ids", first, mic_ids[mic_codes], np.int32)
        for name, label in (("defocus_u_a", "rlnDefocusU"), ("defocus_v_a", "rlnDefocusV"),
                            ("voltage_kv", "rlnVoltage"), ("cs_mm", "rlnSphericalAberration"),
                            ("amplitude_contrast", "rlnAmplitudeContrast")):
            cols.add(name, first, value(label))
        cols.add("defocus_angle_rad", first, np.deg2rad(value("rlnDefocusAngle")))
        if "rlnPhaseShift" in chunk.columns:
            cols.add("phase_shift_rad", first, np.deg2rad(value("rlnPhaseShift")))
        if "rlnCtfBfactor" in chunk.columns:
            cols.add("bfactor_a2", first, value("rlnCtfBfactor"))
        if apix_labels == ("rlnImagePixelSize",):
            apix = value("rlnImagePixelSize")
        else:
            mag = value("rlnMagnification")
            if (mag <= 0).any():
                raise InputError(f"{p}: rlnMagnification must be positive (found {mag.min():g})")
            apix = value("rlnDetectorPixelSize") * 1e4 / mag
        if (apix <= 0).any():
            raise InputError(f"{p}: pixel size must be positive (found {apix.min():g} A)")
        cols.add("pixel_size_a", first, apix)
        if "rlnImageSize" in available:
            box_sizes.update(np.unique(value("rlnImageSize")).tolist())
        if has_angles:
            angles = np.stack([value(label) for label in ANGLE_LABELS], axis=1)
            cols.add("rotations", first, euler_deg_to_matrix(angles))
        if origin_labels:
            origin = np.stack([value(label) for label in origin_labels], axis=1)
            cols.add("shifts_a", first, -origin * (apix[:, None] if origin_in_px else 1.0))
        n += len(chunk)
    if n == 0:
        raise InputError(f"{p}: the particle table is empty")
    if n != cols.n:
        raise InputError(f"{p}: read {n} particle rows where {cols.n} were counted (malformed rows?)")
    _release_freed_memory()

    base, folder = star_base_dirs(p), p.parent.absolute()
    resolved = [resolve_stack_path(raw, base, datadir, basename_dir=folder) for raw in raw_ids]
    file_ids: dict[str, int] = {}  # two names may resolve to the same file
    remap = np.array([file_ids.setdefault(r, len(file_ids)) for r in resolved], dtype=np.int32)
    stack_names: dict[str, str] = {}
    for raw, r in zip(raw_ids, resolved, strict=True):
        stack_names.setdefault(r, raw)
    stack_ids = remap[cols.get("stack_ids")]
    stack_files = tuple(file_ids)
    box = _box_size(p, box_sizes, stack_files)

    rotations = cols.get("rotations") if cols.has("rotations") else None
    shifts = cols.get("shifts_a") if cols.has("shifts_a") else None
    if shifts is None and rotations is not None:
        shifts = np.broadcast_to(np.float32(0), (n, 2))

    def column(name: str) -> np.ndarray:
        return compact_column(cols.get(name)) if cols.has(name) else compact_column(0.0, n)

    return ParticleTable(
        stack_files=stack_files,
        stack_ids=stack_ids,
        stack_indices=cols.get("stack_indices"),
        box_px=box,
        pixel_size_a=column("pixel_size_a"),
        defocus_u_a=column("defocus_u_a"),
        defocus_v_a=column("defocus_v_a"),
        defocus_angle_rad=column("defocus_angle_rad"),
        voltage_kv=column("voltage_kv"),
        cs_mm=column("cs_mm"),
        amplitude_contrast=column("amplitude_contrast"),
        phase_shift_rad=column("phase_shift_rad"),
        bfactor_a2=column("bfactor_a2"),
        rotations=rotations,
        shifts_a=shifts,
        optics=optics_frame,
        optics_group=cols.get("optics_group") if cols.has("optics_group") else None,
        micrograph_ids=cols.get("micrograph_ids") if cols.has("micrograph_ids") else None,
        stack_names=stack_names,
        source_path=str(p.absolute()),
        source_format="star",
        source_stamp=(stat.st_size, stat.st_mtime_ns),
    )


def read_star_columns(path: str | os.PathLike, wanted) -> dict[str, np.ndarray]:
    """Columns of a STAR file's particle table, parsed as numbers where they are numbers.

    Parameters
    ----------
    path : ``.star`` file.
    wanted : a label -> bool test; the columns whose label passes are read (streamed, the
        others are not parsed).

    Returns
    -------
    dict label -> (N,) array, in the file's column order; empty when no label passes.

    Raises
    ------
    InputError
        Not a STAR file, no particle table, a malformed row.
    """
    p = require_file(path, "STAR file")
    block, _ = _pick_blocks(p, scan_star(p))
    labels = [label for label in block.labels if wanted(label)]
    if not labels:
        return {}
    chunks = list(iter_loop(p, block, usecols=labels))
    if not chunks:
        return {label: np.empty(0) for label in labels}
    frame = pd.concat(chunks) if len(chunks) > 1 else chunks[0]
    return {label: frame[label].to_numpy() for label in labels}


def _release_freed_memory() -> None:
    """Hand the heap pages freed by the parser back to the OS (glibc's ``malloc_trim``; a
    no-op elsewhere), so that they do not add to the resident memory of a long run.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _box_size(p: Path, sizes: set[float], stack_files: tuple[str, ...]) -> int:
    if sizes:
        if len(sizes) > 1:
            listed = ", ".join(f"{s:g}" for s in sorted(sizes)[:5])
            raise InputError(f"{p}: mixed box sizes {listed} in rlnImageSize; cryoai needs one "
                             "box size")
        box = int(next(iter(sizes)))
    else:
        box = box_from_first_stack(p, stack_files, "rlnImageSize")
    if box % 2:
        raise InputError(f"{p}: box size {box} is odd; cryoai needs even boxes")
    if box < 2:
        raise InputError(f"{p}: invalid box size {box}")
    return box
