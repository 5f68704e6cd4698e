"""The in-memory particle table that every particle file format maps to."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

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


@dataclass
class ParticleTable:
    """Per-particle metadata, in cryoai's units and conventions (CONVENTIONS.md).

    Attributes
    ----------
    stack_paths : (N,) object array of str, absolute path of the stack holding each image.
    stack_indices : (N,) int64, 0-based index of the image in its stack.
    box_px : int, image size N (images are N x N).
    pixel_size_a : (N,) float64, Angstrom per pixel.
    defocus_u_a, defocus_v_a : (N,) float64, Angstrom, positive = underfocus.
    defocus_angle_rad : (N,) float64, astigmatism angle, radians.
    voltage_kv : (N,) float64, kV.
    cs_mm : (N,) float64, spherical aberration, mm.
    amplitude_contrast : (N,) float64.
    phase_shift_rad : (N,) float64.
    bfactor_a2 : (N,) float64, CTF B-factor (envelope ``exp(-B s^2/4)``), A^2.
    rotations : (N, 3, 3) float64 or None, pose mapping image to volume frame.
    shifts_a : (N, 2) float64 or None, translation of the projection in the image, Angstrom
        (``= -rlnOrigin{X,Y}Angst``).
    source : pandas DataFrame or None, the original rows (all columns), kept for export.
    optics : pandas DataFrame or None, the original optics table (STAR 3.1).
    source_path : str or None, the file this table was read from.
    """

    stack_paths: np.ndarray
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
    source: pd.DataFrame | None = field(default=None, repr=False)
    optics: pd.DataFrame | None = field(default=None, repr=False)
    source_path: str | None = None

    def __len__(self) -> int:
        return len(self.stack_indices)

    @property
    def has_poses(self) -> bool:
        return self.rotations is not None

    @property
    def has_shifts(self) -> bool:
        return self.shifts_a is not None

    def subset(self, indices) -> ParticleTable:
        """A new table with the rows ``indices`` (int array or boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                changes[f.name] = value[idx]
            elif isinstance(value, pd.DataFrame) and f.name == "source":
                changes[f.name] = value.iloc[idx].reset_index(drop=True)
        return replace(self, **changes)

    def with_poses(self, rotations: np.ndarray, shifts_a: np.ndarray | None) -> ParticleTable:
        """A copy with poses replaced: rotations (N, 3, 3), shifts_a (N, 2) or None."""
        shifts = None if shifts_a is None else np.asarray(shifts_a, dtype=np.float64)
        return replace(self, rotations=np.asarray(rotations, dtype=np.float64), shifts_a=shifts)

    def ctf_arrays(self, indices=None) -> dict[str, np.ndarray]:
        """The CTF parameters (names of :data:`CTF_FIELDS`) for ``indices`` (all if None)."""
        sel = slice(None) if indices is None else np.asarray(indices)
        return {name: getattr(self, name)[sel] for name in CTF_FIELDS}
