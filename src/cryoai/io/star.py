"""RELION STAR particle files (3.0 single table, 3.1+ optics and particles tables).

Reading maps a STAR file to a :class:`~cryoai.io.particles.ParticleTable` in cryoai's units:

- ``rlnImageName = "000012@Particles/stack.mrcs"`` -> stack index 11 (STAR is 1-based), stack
  path resolved relative to the STAR file's directory, else the same basename there, else in
  ``datadir`` (a missing stack is reported only when images are read or validated);
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

Writing produces RELION 3.1 (``data_optics`` + ``data_particles``), atomically.

Both directions stream: the particle rows are parsed in chunks into the table's compact
columns (only the columns cryoai uses are parsed), and writing copies the other columns of
the source file's rows chunk by chunk, so that neither holds the text of a million-particle
file in memory. (``starfile``, which reads a whole block into one DataFrame, is used by the
tests as an independent reader.)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoai import __version__
from cryoai.errors import InputError
from cryoai.physics.poses import Poses
from cryoai.physics.rotations import euler_zyz_to_matrix, matrix_to_euler_zyz

from ._util import (
    atomic_path,
    box_from_first_stack,
    one_line,
    paths_relative_to,
    require_file,
    resolve_stack_path,
)
from .particles import ParticleTable, compact_column, is_constant

ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_ANGST_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGIN_PX_LABELS = ("rlnOriginX", "rlnOriginY")
#: Required CTF labels (from the particle rows or the optics table).
CTF_LABELS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
#: Labels that RELION 3.1 keeps per optics group rather than per particle.
OPTICS_LEVEL_LABELS = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnMagnification",
    "rlnDetectorPixelSize",
)
#: Flags of images whose CTF was already applied or undone; cryoai models raw images (the
#: microscope's CTF, once), so a file that sets one is refused, naming the flag.
CTF_STATE_LABELS = {
    "rlnCtfDataArePhaseFlipped": "phase-flipped (rlnCtfDataArePhaseFlipped = 1); cryoai needs the "
                                 "images as recorded: extract them without phase flipping",
    "rlnCtfDataAreCtfPremultiplied": "multiplied by their CTF (rlnCtfDataAreCtfPremultiplied = 1); "
                                     "cryoai needs the images as recorded: extract them without "
                                     "CTF premultiplication",
}
#: Rows parsed at a time.
CHUNK_ROWS = 50_000
#: Rows formatted at a time when writing (small: many short-lived strings per row).
WRITE_CHUNK_ROWS = 8192


# ----------------------------------------------------------------------------- the file's layout


@dataclass
class StarBlock:
    """One ``data_`` block of a STAR file, located but not parsed.

    Attributes
    ----------
    name : the block's name (``data_particles`` -> ``"particles"``).
    labels : column labels without the leading underscore.
    is_loop : a ``loop_`` table (else ``label value`` pairs, held in ``pairs``).
    offset : byte offset of the first row of a loop.
    n_rows : number of rows of a loop.
    pairs : the values of a pair block, as text.
    """

    name: str
    labels: list[str] = field(default_factory=list)
    is_loop: bool = False
    offset: int = 0
    n_rows: int = 0
    pairs: dict[str, str] = field(default_factory=dict)


def scan_star(path: str | os.PathLike) -> dict[str, StarBlock]:
    """The blocks of a STAR file, in order: labels and where the rows of each loop are.

    One pass over the lines, keeping only the labels and counts (not the rows).

    Raises
    ------
    InputError
        Not a STAR file (binary, no ``data_`` block, text outside a block).
    """
    p = Path(path)
    blocks: dict[str, StarBlock] = {}
    block: StarBlock | None = None
    state = "none"  # none | block | labels | rows
    offset = 0
    try:
        with open(p, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                start = offset
                offset += len(raw)
                s = raw.strip()
                if not s or s.startswith(b"#"):
                    continue
                if b"\x00" in s:
                    raise InputError(f"{p}: not a STAR file (binary content at line {line_no})")
                if s.startswith(b"data_"):
                    name = s[5:].split()[0].decode("utf-8", "replace") if len(s) > 5 else ""
                    block = StarBlock(name=name)
                    blocks[name] = block
                    state = "block"
                    continue
                if block is None:
                    raise InputError(f"{p}: not a STAR file (line {line_no} is outside any data_ "
                                     "block)")
                if s.startswith(b"loop_"):
                    if block.labels:
                        raise InputError(f"{p}: line {line_no}: a second loop_ in data_{block.name}")
                    block.is_loop = True
                    state = "labels"
                    continue
                if s.startswith(b"_"):
                    if state == "rows":
                        raise InputError(f"{p}: line {line_no}: a label after the rows of "
                                         f"data_{block.name}")
                    parts = s[1:].decode("utf-8", "replace").split(None, 1)
                    if state == "labels":
                        block.labels.append(parts[0])
                    else:
                        value = parts[1].strip() if len(parts) > 1 else ""
                        block.labels.append(parts[0])
                        block.pairs[parts[0]] = value.strip("'\"")
                    continue
                if state == "labels":
                    if not block.labels:
                        raise InputError(f"{p}: line {line_no}: a loop_ without labels in "
                                         f"data_{block.name}")
                    block.offset = start
                    state = "rows"
                if state != "rows":
                    raise InputError(f"{p}: not a STAR file (unexpected text at line {line_no})")
                block.n_rows += 1
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({one_line(exc.strerror or exc)})") from exc
    if not blocks:
        raise InputError(f"{p}: not a STAR file (no data_ blocks found)")
    return blocks


def iter_loop(path: str | os.PathLike, block: StarBlock, *, usecols: Iterable[str] | None = None,
              as_text: bool = False, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of a loop block (or the one row of a pair block), ``chunk_rows`` at a time.

    Parameters
    ----------
    usecols : labels to parse (all if None).
    as_text : keep every value as the text written in the file (else numbers are parsed).

    Yields
    ------
    DataFrame chunks whose index is the row number in the block (0-based).

    Raises
    ------
    InputError
        A row with more values than labels.
    """
    p = Path(path)
    if not block.is_loop:
        frame = pd.DataFrame([block.pairs], dtype=object if as_text else None)
        if usecols is not None:
            frame = frame[[c for c in block.labels if c in set(usecols)]]
        if not as_text:
            frame = frame.apply(_maybe_numeric)
        yield frame
        return
    if block.n_rows == 0:
        return
    cols = None if usecols is None else [c for c in block.labels if c in set(usecols)]
    with open(p, "rb") as f:
        f.seek(block.offset)
        reader = pd.read_csv(
            f, sep=r"\s+", header=None, names=block.labels, usecols=cols, nrows=block.n_rows,
            chunksize=chunk_rows, dtype=object if as_text else {"rlnImageName": object},
            keep_default_na=False, na_values=[] if as_text else [""], quotechar='"',
            comment=None, skip_blank_lines=True, engine="c")
        row = 0
        try:
            for chunk in reader:
                chunk.index = pd.RangeIndex(row, row + len(chunk))
                row += len(chunk)
                yield chunk
        except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: malformed row in data_{block.name} near particle row "
                             f"{row + 1} ({one_line(exc)})") from exc


def _maybe_numeric(col: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(col)
    except (ValueError, TypeError):
        return col


def read_loop_frame(path: str | os.PathLike, block: StarBlock, *, as_text: bool = False
                    ) -> pd.DataFrame:
    """A whole (small) block as one DataFrame (see :func:`iter_loop`)."""
    chunks = list(iter_loop(path, block, as_text=as_text))
    if not chunks:
        return pd.DataFrame(columns=block.labels)
    return pd.concat(chunks) if len(chunks) > 1 else chunks[0]


# ----------------------------------------------------------------------------------- reading


def _pick_blocks(p: Path, blocks: dict[str, StarBlock]) -> tuple[StarBlock, StarBlock | None]:
    """(particle block, optics block or None)."""
    optics = blocks.get("optics")
    if "particles" in blocks:
        return blocks["particles"], optics
    if optics is not None:
        raise InputError(f"{p}: has data_optics but no data_particles table")
    if len(blocks) == 1:
        return next(iter(blocks.values())), None
    with_names = [name for name, b in blocks.items() if "rlnImageName" in b.labels]
    if len(with_names) == 1:
        return blocks[with_names[0]], None
    found = ", ".join(f"data_{n}" for n in blocks)
    if not with_names:
        raise InputError(f"{p}: no data_particles table (and no block with rlnImageName among "
                         f"{found})")
    raise InputError(f"{p}: several blocks with rlnImageName ({found}); expected one "
                     "particle table")


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
    datadir : optional directory where image stacks are looked up when they are neither at
        the path written in ``rlnImageName`` (relative to the STAR file) nor next to the STAR.
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

    base = [p.parent.absolute()]
    resolved = [resolve_stack_path(raw, base, datadir) for raw in raw_ids]
    file_ids: dict[str, int] = {}  # two names may resolve to the same file
    remap = np.array([file_ids.setdefault(r, len(file_ids)) for r in resolved], dtype=np.int32)
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
        source_path=str(p.absolute()),
        source_format="star",
        source_stamp=(stat.st_size, stat.st_mtime_ns),
    )


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


def euler_deg_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, (n, 3), to poses ``Rz(rot) Ry(tilt) Rz(psi)``, (n, 3, 3).

    The convention is :func:`cryoai.physics.rotations.euler_zyz_to_matrix` (CONVENTIONS.md,
    Rotations); here only degrees become radians, in float64.
    """
    angles_rad = np.deg2rad(np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3))
    return euler_zyz_to_matrix(torch.from_numpy(angles_rad)).numpy()


def matrix_to_euler_deg(rotations: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_deg_to_matrix`: (n, 3, 3) -> (rot, tilt, psi) degrees, (n, 3).

    The convention is :func:`cryoai.physics.rotations.matrix_to_euler_zyz` (``tilt`` in
    [0, 180]; at the gimbal lock psi is 0 and rot carries the whole in-plane angle), in float64.
    As scipy's ``Rotation.from_matrix`` does, matrices that are not orthonormal to 1e-12 (the
    table's float32 poses) are first replaced by the nearest rotation (``U @ Vt`` of their SVD),
    so the angles are those of ``Rotation.from_matrix(R).as_euler("ZYZ", degrees=True)``.

    Raises
    ------
    ValueError
        A matrix with a non-positive determinant (not a rotation).
    """
    m = np.array(rotations, dtype=np.float64).reshape(-1, 3, 3)
    det = np.linalg.det(m)
    if np.any(det <= 0):
        ind = int(np.nonzero(det <= 0)[0][0])
        raise ValueError(f"Non-positive determinant (left-handed or null coordinate frame) in "
                         f"rotation matrix {ind}: {m[ind]}.")
    gram = m @ m.transpose(0, 2, 1)
    fix = ~np.all(np.isclose(gram, np.eye(3), atol=1e-12), axis=(1, 2))
    if fix.any():
        u, _, vt = np.linalg.svd(m[fix])
        m[fix] = u @ vt
    return np.rad2deg(matrix_to_euler_zyz(torch.from_numpy(m)).numpy())


# ----------------------------------------------------------------------------------- writing

#: Particle labels that :func:`write_star` writes from the table (the others are carried over).
_WRITTEN_LABELS = ("rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV",
                   "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", *ANGLE_LABELS,
                   *ORIGIN_ANGST_LABELS)
_OPTICS_CHECKS = (("rlnImagePixelSize", "pixel_size_a"), ("rlnVoltage", "voltage_kv"),
                  ("rlnSphericalAberration", "cs_mm"), ("rlnAmplitudeContrast", "amplitude_contrast"))


def _text(values: np.ndarray) -> np.ndarray:
    """Numbers as the shortest text that reads back to the same single-precision value."""
    return np.asarray(values, dtype=np.float32).astype(str)


def _text9(values: np.ndarray) -> np.ndarray:
    """Numbers converted from the table's units (e.g. radians to degrees) with 9 significant
    digits, so that converting back and rounding to single precision gives the same value.
    """
    return np.char.mod("%.9g", np.asarray(values, dtype=np.float64))


def _quoted(values) -> list[str]:
    """Text values, those that hold blanks or are empty in double quotes (STAR's quoting)."""
    out = [str(v) for v in np.asarray(values, dtype=object)]
    return [v if len(v.split()) == 1 and v == v.strip() else f'"{v}"' for v in out]


def _rows_text(columns: list[list[str]]) -> str:
    """Tab-separated lines from columns of text."""
    return "".join(line + "\n" for line in map("\t".join, zip(*columns, strict=True)))


def _original_optics_fit(table: ParticleTable, chunk_rows: int) -> bool:
    """Whether the table's optics (per particle) still agree with its original optics table."""
    optics, groups = table.optics, table.optics_group
    if optics is None or groups is None or "rlnOpticsGroup" not in optics.columns:
        return False
    try:
        index = pd.Index(pd.to_numeric(optics["rlnOpticsGroup"], errors="raise").astype(np.int64))
        values = {attr: pd.to_numeric(optics[label], errors="raise").to_numpy(dtype=np.float64)
                  for label, attr in _OPTICS_CHECKS}
        if "rlnImageSize" in optics.columns:
            sizes = pd.to_numeric(optics["rlnImageSize"], errors="raise").to_numpy()
            if not (sizes == table.box_px).all():
                return False
    except (KeyError, ValueError, TypeError):
        return False
    for start in range(0, len(table), chunk_rows):
        sl = slice(start, start + chunk_rows)
        pos = index.get_indexer(np.asarray(groups[sl], dtype=np.int64))
        if (pos < 0).any():
            return False
        for attr, ref in values.items():
            if not np.allclose(getattr(table, attr)[sl], ref[pos].astype(np.float32), rtol=1e-6,
                               atol=1e-9):
                return False
        if is_constant(groups) and all(is_constant(getattr(table, a)) for a in values):
            break  # every chunk is the same
    return True


def _build_optics(table: ParticleTable) -> tuple[pd.DataFrame, np.ndarray]:
    """One optics group per distinct (pixel size, voltage, Cs, amplitude contrast)."""
    attrs = [attr for _, attr in _OPTICS_CHECKS]
    if all(is_constant(getattr(table, a)) for a in attrs):
        unique = np.array([[getattr(table, a)[0] for a in attrs]], dtype=np.float32)
        group_of = np.broadcast_to(np.int32(1), (len(table),))
    else:
        keys = np.stack([np.asarray(getattr(table, a), dtype=np.float32) for a in attrs], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        group_of = inverse.reshape(-1).astype(np.int32) + 1
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(unique) + 1).astype(str),
        "rlnOpticsGroupName": [f"opticsGroup{i}" for i in range(1, len(unique) + 1)],
        "rlnAmplitudeContrast": _text(unique[:, 3]),
        "rlnSphericalAberration": _text(unique[:, 2]),
        "rlnVoltage": _text(unique[:, 1]),
        "rlnImagePixelSize": _text(unique[:, 0]),
        "rlnImageSize": str(table.box_px),
        "rlnImageDimensionality": "2",
    })
    return optics, group_of


class _PoseChunks:
    """Regroups an iterable of pose chunks ``(rotations (k, 3, 3), shifts_a (k, 2) or None)``
    into blocks of the sizes asked for, copied into one buffer per block (holding many small
    arrays while large temporaries come and go would fragment the heap).
    """

    def __init__(self, chunks: Iterable[tuple[np.ndarray, np.ndarray | None]]):
        self.it = iter(chunks)
        self.rest: tuple[np.ndarray, np.ndarray] | None = None

    def _next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rest is not None:
            out, self.rest = self.rest, None
            return out
        try:
            rot, shift = next(self.it)
        except StopIteration:
            raise ValueError("the pose chunks hold fewer rows than the table") from None
        rot = np.asarray(rot).reshape(-1, 3, 3)
        shift = np.zeros((len(rot), 2)) if shift is None else np.asarray(shift).reshape(-1, 2)
        return rot, shift

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rot_out, shift_out = np.empty((k, 3, 3)), np.empty((k, 2))
        filled = 0
        while filled < k:
            rot, shift = self._next()
            m = min(k - filled, len(rot))
            rot_out[filled:filled + m], shift_out[filled:filled + m] = rot[:m], shift[:m]
            filled += m
            if m < len(rot):
                self.rest = (rot[m:].copy(), shift[m:].copy())
        return rot_out, shift_out

    def finish(self) -> None:
        if self.rest is not None or next(self.it, None) is not None:
            raise ValueError("the pose chunks hold more rows than the table")


def _carry_source(table: ParticleTable) -> tuple[Path, StarBlock] | None:
    """The source STAR file and particle block whose other columns can be carried over."""
    if table.source_format != "star" or not table.source_path:
        return None
    src = Path(table.source_path)
    try:
        stat = src.stat()
        if table.source_stamp is not None and (stat.st_size, stat.st_mtime_ns) != tuple(
                table.source_stamp):
            raise OSError("changed since it was read")
        block, _ = _pick_blocks(src, scan_star(src))
    except (OSError, InputError) as exc:
        warnings.warn(f"{src}: cannot carry its other columns over ({one_line(exc)}); writing "
                      "cryoai's columns only", stacklevel=3)
        return None
    n_rows = block.n_rows if block.is_loop else 1
    rows = table.source_rows
    if (rows is None and n_rows != len(table)) or (rows is not None and len(rows) and
                                                   int(np.max(rows)) >= n_rows):
        warnings.warn(f"{src}: has {n_rows} particle rows, which do not match the table's "
                      f"{len(table)}; writing cryoai's columns only", stacklevel=3)
        return None
    return src, block


def _loop_header(name: str, labels: list[str]) -> str:
    lines = [f"data_{name}", "", "loop_"]
    lines += [f"_{label} #{i}" for i, label in enumerate(labels, start=1)]
    return "\n".join(lines) + "\n"


def write_star(path: str | os.PathLike, table: ParticleTable, *,
               poses: Poses | Iterable[tuple[np.ndarray, np.ndarray | None]] | None = None,
               chunk_rows: int = WRITE_CHUNK_ROWS,
               extra_columns: dict[str, np.ndarray] | None = None) -> None:
    """Write ``table`` as a RELION 3.1 particle STAR file (atomically, streaming).

    Parameters
    ----------
    path : output ``.star``.
    table : the particles.
    poses : optional :class:`cryoai.physics.poses.Poses` of every row, or an iterable of
        ``(rotations (k, 3, 3), shifts_a (k, 2) or None)`` chunks, in row order and
        ``len(table)`` rows in all (so that the poses of a million particles need not be held at
        once), written instead of the table's own poses.
    chunk_rows : rows formatted at a time.
    extra_columns : further particle columns, label -> (N,) values written as text (e.g. a
        simulation's ``rlnMicrographName``); they replace a carried column of the same label.

    Notes
    -----
    - When the table was read from a STAR file, every other column of its particle rows is
      carried over from that file, read again chunk by chunk (it must not have changed since;
      otherwise a warning says that only cryoai's columns are written). ``rlnImageName``
      (``NNNNNN@stack``, the stack path relative to the output directory), the CTF columns
      and, when there are poses, ``rlnAngleRot/Tilt/Psi`` (degrees) and
      ``rlnOriginXAngst/YAngst`` (``= -shifts_a``) are written from the table. 3.0-only
      columns (``rlnOriginX/Y`` in pixels and the per-particle optics labels such as
      ``rlnVoltage``, ``rlnMagnification``) move to their 3.1 form.
    - ``data_optics`` is the original optics table when it still matches the particles' CTF
      and pixel size, else one group per distinct (pixel size, voltage, Cs, amplitude
      contrast), all with ``rlnImageSize = box_px``.
    - Numbers are written as the shortest text that reads back to the same single-precision
      value (the table's precision).
    """
    out = Path(path)
    if isinstance(poses, Poses):
        poses = poses.chunks()
    n = len(table)
    source = _carry_source(table)
    src_labels = source[1].labels if source else []
    if _original_optics_fit(table, chunk_rows):
        optics = table.optics.copy()
        if "rlnImageSize" not in optics.columns:
            optics["rlnImageSize"] = str(table.box_px)
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = "2"
        groups = table.optics_group
    else:
        optics, groups = _build_optics(table)
    with_poses = poses is not None or table.rotations is not None
    with_shifts = poses is not None or table.shifts_a is not None
    written = ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
               "rlnPhaseShift", "rlnCtfBfactor"]
    written += list(ANGLE_LABELS) if with_poses else []
    written += list(ORIGIN_ANGST_LABELS) if with_shifts else []
    dropped = set(OPTICS_LEVEL_LABELS) | set(ORIGIN_PX_LABELS) | set(_WRITTEN_LABELS)
    extra_columns = {label: np.asarray(values) for label, values in (extra_columns or {}).items()}
    for label, values in extra_columns.items():
        if values.shape != (n,):
            raise ValueError(f"extra column {label}: {values.shape} values for {n} particles")
    carried = [label for label in src_labels if label not in dropped and label not in extra_columns]
    labels = [label for label in src_labels if label in carried or label in written]
    labels += [label for label in written if label not in labels]
    labels += [label for label in extra_columns if label not in labels]

    relative = paths_relative_to(table.stack_files, out.parent)
    pose_chunks = _PoseChunks(poses) if poses is not None else None

    def carried_chunks() -> Iterator[pd.DataFrame]:
        if not carried:
            while True:
                yield None
        src, block = source
        if table.source_rows is None:  # the same rows in the same order: stream in lockstep
            yield from iter_loop(src, block, usecols=carried, as_text=True, chunk_rows=chunk_rows)
            return
        whole = read_loop_frame(src, block, as_text=True)[carried]  # a subset: any order
        for start in range(0, n, chunk_rows):
            yield whole.iloc[table.source_rows[start:start + chunk_rows]]

    with atomic_path(out, suffix=".star") as tmp, open(tmp, "w", newline="\n") as f:
        f.write(f"# Written by cryoai {__version__}\n\n")
        f.write(_loop_header("optics", list(optics.columns)))
        f.write(_rows_text([_quoted(optics[c].to_numpy()) for c in optics.columns]))
        f.write("\n\n")
        f.write(_loop_header("particles", labels))
        extra = carried_chunks()
        for start in range(0, n, chunk_rows):
            sl = slice(start, min(start + chunk_rows, n))
            k = sl.stop - sl.start
            cols: dict[str, object] = {}
            cols["rlnImageName"] = [f"{i + 1:06d}@{relative[s]}" for i, s in
                                    zip(table.stack_indices[sl].tolist(), table.stack_ids[sl].tolist(),
                                        strict=True)]
            cols["rlnOpticsGroup"] = np.asarray(groups[sl]).astype(str)
            cols["rlnDefocusU"] = _text(table.defocus_u_a[sl])
            cols["rlnDefocusV"] = _text(table.defocus_v_a[sl])
            cols["rlnDefocusAngle"] = _text9(np.rad2deg(table.defocus_angle_rad[sl].astype(np.float64)))
            cols["rlnPhaseShift"] = _text9(np.rad2deg(table.phase_shift_rad[sl].astype(np.float64)))
            cols["rlnCtfBfactor"] = _text(table.bfactor_a2[sl])
            if pose_chunks is not None:
                rot, shifts = pose_chunks.take(k)
            else:
                rot = None if table.rotations is None else table.rotations[sl]
                shifts = None if table.shifts_a is None else table.shifts_a[sl]
            if with_poses:
                angles = matrix_to_euler_deg(rot)
                for j, label in enumerate(ANGLE_LABELS):
                    cols[label] = _text9(angles[:, j])
            if with_shifts:
                shifts = np.zeros((k, 2)) if shifts is None else np.asarray(shifts).reshape(k, 2)
                cols["rlnOriginXAngst"] = _text(-shifts[:, 0])
                cols["rlnOriginYAngst"] = _text(-shifts[:, 1])
            carried_rows = next(extra)
            if carried_rows is not None:
                if len(carried_rows) != k:
                    raise InputError(f"{source[0]}: changed while being read")
                for label in carried:
                    cols[label] = _quoted(carried_rows[label].to_numpy())
            for label, values in extra_columns.items():
                cols[label] = _quoted(values[sl].astype(str))
            f.write(_rows_text([list(np.asarray(cols[label]).tolist()) if not isinstance(cols[label], list)
                                else cols[label] for label in labels]))
        if pose_chunks is not None:
            pose_chunks.finish()

