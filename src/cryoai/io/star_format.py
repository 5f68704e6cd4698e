"""The STAR format itself, shared by reading (:mod:`cryoai.io.star`) and writing
(:mod:`cryoai.io.star_write`): RELION's labels, the file's ``data_`` blocks and loops, and
RELION's Euler angle convention.

A STAR file is scanned once for its blocks (:func:`scan_star`: labels and where the rows of
each loop are, not the rows), then a loop's rows are parsed in chunks (:func:`iter_loop`), only
the columns asked for, so that the text of a million-particle file is never held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoai.errors import InputError
from cryoai.physics.rotations import euler_zyz_to_matrix, matrix_to_euler_zyz

from ._util import one_line

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


# ------------------------------------------------------------------------------------ angles


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

