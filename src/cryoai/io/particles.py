"""The in-memory particle table that every particle file format maps to.

The table is built to stay small for millions of particles: the stack of each image is a
small integer into a list of distinct stack files, per-particle values are single precision
(as in cryoSPARC's ``.cs`` files: about 7 significant digits, far below any physical
uncertainty of these quantities), and a column whose value is the same for every particle
(typically voltage, Cs, amplitude contrast, pixel size, phase shift, B-factor) is a read-only
stride-0 view that holds one number. The original rows of the file are not kept: writing a
STAR file streams them back from the source file (:func:`cryoai.io.star.write_star`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

from ..physics.poses import Poses

CTF_FIELDS = (
    "defocus_u_a",
    "defocus_v_a",
    "defocus_angle_rad",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_rad",
    "bfactor_a2",
)
#: Per-particle columns of a :class:`ParticleTable` (all of length N).
COLUMN_FIELDS = ("pixel_size_a", *CTF_FIELDS)


def compact_column(values, n: int | None = None, dtype=np.float32) -> np.ndarray:
    """A per-particle column in its compact form.

    Parameters
    ----------
    values : scalar or (n,) array.
    n : length when ``values`` is a scalar.
    dtype : storage type (float32 by default).

    Returns
    -------
    (n,) array of ``dtype``; a read-only stride-0 view of one value when all values are equal.
    """
    arr = np.asarray(values)
    if arr.ndim == 0:
        if n is None:
            raise ValueError("a scalar column needs its length n")
        return np.broadcast_to(np.asarray(arr, dtype=dtype), (int(n),))
    arr = arr.reshape(-1)
    if arr.size and arr.strides == (0,):
        return np.broadcast_to(np.asarray(arr[0], dtype=dtype), arr.shape)
    arr = np.asarray(arr, dtype=dtype)
    if arr.size > 1 and (arr == arr[0]).all():
        return np.broadcast_to(arr[:1].copy()[0], arr.shape)
    return arr


def is_constant(values: np.ndarray) -> bool:
    """Whether a column holds one value for all particles (cheap for compact columns)."""
    arr = np.asarray(values)
    return arr.size <= 1 or arr.strides == (0,) or bool((arr == arr.reshape(-1)[0]).all())


@dataclass
class ParticleTable:
    """Per-particle metadata, in cryoai's units and conventions (CONVENTIONS.md).

    Attributes
    ----------
    stack_files : tuple of str, the distinct image stacks (absolute paths).
    stack_names : dict or None, stack file (as in ``stack_files``) -> its name in the file the
        table was read from, as written there (relative to the project folder, to that file's
        folder, or absolute); writers keep these names (``image_paths="as_read"``).
    stack_ids : (N,) int32, index into ``stack_files`` of the stack holding each image.
    stack_indices : (N,) int32, 0-based index of the image in its stack.
    box_px : int, image size N (images are N x N).
    pixel_size_a : (N,) float32, Angstrom per pixel.
    defocus_u_a, defocus_v_a : (N,) float32, Angstrom, positive = underfocus.
    defocus_angle_rad : (N,) float32, astigmatism angle, radians.
    voltage_kv : (N,) float32, kV.
    cs_mm : (N,) float32, spherical aberration, mm.
    amplitude_contrast : (N,) float32.
    phase_shift_rad : (N,) float32.
    bfactor_a2 : (N,) float32, CTF B-factor (envelope ``exp(-B s^2/4)``), A^2.
    rotations : (N, 3, 3) float32 or None, pose mapping image to volume frame.
    shifts_a : (N, 2) float32 or None, translation of the projection in the image, Angstrom
        (``= -rlnOrigin{X,Y}Angst``).
    optics : pandas DataFrame or None, the original optics table (STAR 3.1).
    optics_group : (N,) int32 or None, each particle's ``rlnOpticsGroup`` in ``optics`` (STAR),
        or cryoSPARC's ``ctf/exp_group_id`` (.cs, without ``optics``).
    image_sign : (N,) float32 or None, cryoSPARC's ``blob/sign`` as read (-1: the protein is
        dark in the images, as extracted from cryo-EM micrographs; +1: bright).
    micrograph_ids : (N,) int32 or None, a code per distinct micrograph (``rlnMicrographName``,
        cryoSPARC's ``location/micrograph_uid``): particles of one micrograph share its noise.
    source_path : str or None, the file this table was read from.
    source_format : ``"star"``, ``"cs"`` or None.
    source_rows : (N,) int64 or None, the row of ``source_path`` each particle came from
        (None: all rows, in file order). STAR export streams the other columns from there.
    source_stamp : (size in bytes, mtime in ns) of ``source_path`` when it was read.

    Columns in :data:`COLUMN_FIELDS` may be stride-0 read-only views (see
    :func:`compact_column`); index them (``table.cs_mm[idx]``) to get ordinary arrays.
    """

    stack_files: tuple[str, ...]
    stack_ids: np.ndarray
    stack_indices: np.ndarray
    box_px: int
    pixel_size_a: np.ndarray
    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_rad: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_rad: np.ndarray
    bfactor_a2: np.ndarray
    rotations: np.ndarray | None = None
    shifts_a: np.ndarray | None = None
    optics: pd.DataFrame | None = field(default=None, repr=False)
    optics_group: np.ndarray | None = field(default=None, repr=False)
    micrograph_ids: np.ndarray | None = field(default=None, repr=False)
    stack_names: dict[str, str] | None = field(default=None, repr=False)
    image_sign: np.ndarray | None = field(default=None, repr=False)
    source_path: str | None = None
    source_format: str | None = None
    source_rows: np.ndarray | None = field(default=None, repr=False)
    source_stamp: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.stack_files = tuple(str(s) for s in self.stack_files)
        n = len(self.stack_indices)
        self.stack_ids = np.asarray(self.stack_ids, dtype=np.int32).reshape(-1)
        self.stack_indices = np.asarray(self.stack_indices, dtype=np.int32).reshape(-1)
        if len(self.stack_ids) != n:
            raise ValueError(f"stack_ids has {len(self.stack_ids)} rows, stack_indices {n}")
        for name in COLUMN_FIELDS:
            col = compact_column(getattr(self, name), n)
            if len(col) != n:
                raise ValueError(f"{name} has {len(col)} rows, expected {n}")
            setattr(self, name, col)
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float32).reshape(n, 3, 3)
        if self.shifts_a is not None:
            self.shifts_a = np.asarray(self.shifts_a, dtype=np.float32).reshape(n, 2)
        if self.optics_group is not None:
            self.optics_group = compact_column(self.optics_group, n, np.int32)
        if self.micrograph_ids is not None:
            self.micrograph_ids = np.asarray(self.micrograph_ids, dtype=np.int32).reshape(n)
        if self.image_sign is not None:
            self.image_sign = compact_column(self.image_sign, n)

    def __len__(self) -> int:
        return len(self.stack_indices)

    @property
    def stack_paths(self) -> np.ndarray:
        """(N,) object array of the stack path of each image (built on demand: O(N) memory)."""
        return np.asarray(self.stack_files, dtype=object)[self.stack_ids]

    @property
    def has_poses(self) -> bool:
        """Whether the table holds a rotation for every particle."""
        return self.rotations is not None

    @property
    def has_shifts(self) -> bool:
        """Whether the table holds a shift for every particle."""
        return self.shifts_a is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-particle arrays (stride-0 columns count as one value)."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                total += value.itemsize if value.strides == (0,) else value.nbytes
        return total

    def median_pixel_size_a(self) -> float:
        """The median pixel size (Angstrom), rounded to single precision's 7 digits."""
        return float(f"{float(np.median(self.pixel_size_a)):.7g}")

    def subset(self, indices) -> ParticleTable:
        """A new table with the rows ``indices`` (int array or boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        rows = np.arange(len(self)) if self.source_rows is None else self.source_rows
        changes = {"source_rows": np.asarray(rows[idx], dtype=np.int64)}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and f.name != "source_rows":
                changes[f.name] = value[idx]
        return replace(self, **changes)

    def poses(self) -> Poses | None:
        """The table's poses as :class:`cryoai.physics.poses.Poses` (float32; zero shifts when
        the file has none), or None when it has no rotations.
        """
        if not self.has_poses:
            return None
        return Poses.from_arrays(self.rotations, self.shifts_a if self.has_shifts else None)

    def with_poses(self, rotations: np.ndarray | None, shifts_a: np.ndarray | None) -> ParticleTable:
        """A copy with poses replaced: rotations (N, 3, 3), shifts_a (N, 2) or None."""
        return replace(self, rotations=rotations, shifts_a=shifts_a)

    def ctf_arrays(self, indices=None) -> dict[str, np.ndarray]:
        """The CTF parameters (names of :data:`CTF_FIELDS`) for ``indices`` (all if None)."""
        sel = slice(None) if indices is None else np.asarray(indices)
        return {name: getattr(self, name)[sel] for name in CTF_FIELDS}
