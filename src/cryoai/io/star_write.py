"""Writing RELION 3.1 particle STAR files (``data_optics`` + ``data_particles``), atomically.

:func:`write_star` streams: the particle rows are formatted ``chunk_rows`` at a time, and the
other columns of the source file's rows (when the table was read from a STAR file) are read
again and copied chunk by chunk, so that the text of a million-particle file is never held in
memory. Reading is :mod:`cryoai.io.star`; both use the format's labels and blocks in
:mod:`cryoai.io.star_format`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from cryoai import __version__
from cryoai.errors import InputError
from cryoai.physics.poses import Poses

from ._util import atomic_path, one_line, stack_names_to_write, star_base_dirs
from .particles import ParticleTable, is_constant
from .star_format import (
    ANGLE_LABELS,
    OPTICS_LEVEL_LABELS,
    ORIGIN_ANGST_LABELS,
    ORIGIN_PX_LABELS,
    StarBlock,
    _pick_blocks,
    iter_loop,
    matrix_to_euler_deg,
    read_loop_frame,
    scan_star,
)

#: Rows formatted at a time when writing (small: many short-lived strings per row).
WRITE_CHUNK_ROWS = 8192

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


def half_set_column(half_set, n: int) -> np.ndarray:
    """``half_set`` checked: (n,) int64 of 0 (first half set) and 1 (second).

    Raises
    ------
    ValueError
        Not ``n`` values, or values other than 0 and 1.
    """
    values = np.asarray(half_set)
    if values.shape != (n,):
        raise ValueError(f"half_set: {values.shape} values for {n} particles")
    if values.size and not np.isin(values, (0, 1)).all():
        raise ValueError("half_set must hold 0 (first half set) or 1 (second) for every particle")
    return values.astype(np.int64)


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


#: The format line RELION 3.1 and later write before each block (read by RELION to tell
#: 3.1 files, with an optics table, from 3.0 ones).
STAR_VERSION_LINE = "# version 30001"


def _loop_header(name: str, labels: list[str]) -> str:
    lines = [STAR_VERSION_LINE, "", f"data_{name}", "", "loop_"]
    lines += [f"_{label} #{i}" for i, label in enumerate(labels, start=1)]
    return "\n".join(lines) + "\n"


def write_star(path: str | os.PathLike, table: ParticleTable, *,
               poses: Poses | Iterable[tuple[np.ndarray, np.ndarray | None]] | None = None,
               chunk_rows: int = WRITE_CHUNK_ROWS,
               extra_columns: dict[str, np.ndarray] | None = None,
               half_set: np.ndarray | None = None,
               image_paths: str = "as_read") -> None:
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
    half_set : optional (N,) ints, 0 or 1: the half set (of the gold-standard split) each
        particle went to, written as ``rlnRandomSubset`` 1 or 2 (RELION's numbering; it
        replaces a carried ``rlnRandomSubset``).
    image_paths : how ``rlnImageName`` names the stacks: ``"as_read"`` (default) keeps the
        names of the file the table was read from (relative to the RELION project folder, as
        RELION writes them), where they lead to the same stacks from the output (looked up
        from the current folder, then the output's folder); others, and stacks of tables not
        read from a file, relative to the output's folder. ``"relative"``: all relative to the
        output's folder. ``"absolute"``: absolute paths.

    Notes
    -----
    - When the table was read from a STAR file, every other column of its particle rows is
      carried over from that file, read again chunk by chunk (it must not have changed since;
      otherwise a warning says that only cryoai's columns are written). ``rlnImageName``
      (``NNNNNN@stack``, the stack named as ``image_paths`` says), the CTF columns
      and, when there are poses, ``rlnAngleRot/Tilt/Psi`` (degrees) and
      ``rlnOriginXAngst/YAngst`` (``= -shifts_a``) are written from the table. 3.0-only
      columns (``rlnOriginX/Y`` in pixels and the per-particle optics labels such as
      ``rlnVoltage``, ``rlnMagnification``) move to their 3.1 form.
    - ``data_optics`` is the original optics table when it still matches the particles' CTF
      and pixel size, else one group per distinct (pixel size, voltage, Cs, amplitude
      contrast), all with ``rlnImageSize = box_px``.
    - Numbers are written as the shortest text that reads back to the same single-precision
      value (the table's precision).
    - Each block is preceded by ``# version 30001``, as RELION 3.1 and later write it.

    Raises
    ------
    ValueError
        ``extra_columns`` or ``half_set`` of the wrong length, ``half_set`` with values other
        than 0 and 1 or given with an ``rlnRandomSubset`` extra column, an unknown
        ``image_paths``.
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
    if half_set is not None:
        if "rlnRandomSubset" in extra_columns:
            raise ValueError("half_set and an rlnRandomSubset extra column: give one")
        extra_columns["rlnRandomSubset"] = half_set_column(half_set, n) + 1
    for label, values in extra_columns.items():
        if values.shape != (n,):
            raise ValueError(f"extra column {label}: {values.shape} values for {n} particles")
    carried = [label for label in src_labels if label not in dropped and label not in extra_columns]
    labels = [label for label in src_labels if label in carried or label in written]
    labels += [label for label in written if label not in labels]
    labels += [label for label in extra_columns if label not in labels]

    relative = stack_names_to_write(table.stack_files, table.stack_names, out, image_paths,
                                    star_base_dirs(out))
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

