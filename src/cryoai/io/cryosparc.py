"""cryoSPARC particle files (``.cs``: a NumPy structured array saved with ``np.save``).

Fields used (per particle):

==========================  ==============================================================
``blob/path``               image stack (bytes; a leading ``>`` means "relative to the
                            project directory" and is stripped)
``blob/idx``                0-based index in the stack
``blob/shape``              (ny, nx) image size, optional (else read from the stack)
``blob/psize_A``            pixel size, Angstrom
``ctf/accel_kv``            voltage, kV
``ctf/cs_mm``               spherical aberration, mm
``ctf/amp_contrast``        amplitude contrast
``ctf/df1_A, ctf/df2_A``    defocus U, V, Angstrom (RELION's rlnDefocusU/V)
``ctf/df_angle_rad``        astigmatism angle, radians (RELION's rlnDefocusAngle in radians)
``ctf/phase_shift_rad``     phase shift, radians (optional, default 0)
``ctf/bfactor``             CTF B-factor, A^2 (optional, default 0)
``alignments3D/pose``       rotation vector (axis * angle, radians), optional
``alignments3D/shift``      in-plane shift, pixels, optional
==========================  ==============================================================

Pose convention (verified, see :func:`pose_to_matrix`): cryoai's pose is
``R = Rotation.from_rotvec(pose).as_matrix()``; RELION's own matrix is its transpose.
Shift convention: ``alignments3D/shift`` has the sign of RELION's origin, in pixels, so
``shifts_a = -shift * blob/psize_A``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryoai.errors import InputError

from ._util import one_line, require_file, resolve_stack_path
from .particles import ParticleTable, compact_column

_CTF_FIELDS = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)


def pose_to_matrix(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (n, 3) rotation vectors -> cryoai poses (n, 3, 3).

    ``R = Rotation.from_rotvec(pose).as_matrix()`` (Rodrigues' formula
    ``I + sin(t) K + (1 - cos(t)) K^2`` with ``K`` the cross-product matrix of the unit axis).

    How this was verified (no ``.cs`` with poses ships with the shared data, so against the two
    public converters, independently written):

    - pyem ``csparc2star`` (code contributed by cryoSPARC's author, pyem PR #5, reported to
      give correct reconstructions in RELION) computes RELION angles as
      ``rot2euler(expmap(pose))``, where pyem's ``expmap`` returns the *transpose* of the
      Rodrigues matrix and ``rot2euler`` inverts RELION's ``Euler_angles2matrix``. So RELION's
      matrix is ``A = from_rotvec(pose).T``.
    - cryoDRGN ``parse_pose_csparc`` takes ``lie_tools.expmap(pose)`` (plain Rodrigues) and
      transposes it, into cryoDRGN's pose convention, whose RELION counterpart
      ``utils.R_from_relion(rot, tilt, psi)`` equals RELION's ``Euler_angles2matrix``, i.e.
      ``A``. Same result: ``A = from_rotvec(pose).T``.
    - RELION's ``A`` is the transpose of cryoai's ``R = Rz(rot) Ry(tilt) Rz(psi)``
      (CONVENTIONS.md), checked numerically in ``tests/io`` by re-implementing pyem's
      ``euler2rot``/``expmap`` and cryoDRGN's ``R_from_relion``. Hence
      ``R = A.T = from_rotvec(pose)``, with no transpose.
    """
    return Rotation.from_rotvec(np.asarray(pose, dtype=np.float64).reshape(-1, 3)).as_matrix()


def matrix_to_pose(rotations: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_to_matrix`: (n, 3, 3) -> (n, 3) rotation vectors."""
    return Rotation.from_matrix(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
                                ).as_rotvec()


def _load(p: Path) -> np.ndarray:
    try:
        data = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise InputError(f"{p}: holds pickled Python objects, which cryoai refuses to load "
                             "(not a cryoSPARC .cs file)") from exc
        raise InputError(f"{p}: not a cryoSPARC .cs file ({one_line(exc)})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{p}: not a cryoSPARC .cs file ({one_line(exc)})") from exc
    if isinstance(data, np.lib.npyio.NpzFile):
        data.close()
        raise InputError(f"{p}: is an .npz archive, not a cryoSPARC .cs file")
    if data.dtype.names is None or data.ndim != 1:
        raise InputError(f"{p}: not a cryoSPARC .cs file (not a 1D table of named fields)")
    if data.dtype.hasobject:
        raise InputError(f"{p}: holds Python objects, which cryoai refuses to load")
    return data


def _field(p: Path, data: np.ndarray, name: str, dtype=np.float32) -> np.ndarray:
    values = np.asarray(data[name], dtype=dtype)
    if not np.isfinite(values).all():
        raise InputError(f"{p}: field {name} has NaN or infinite values")
    return values


def read_cs(path: str | os.PathLike, datadir: str | os.PathLike | None = None, *,
            read_poses: bool = True) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file.

    Parameters
    ----------
    path : ``.cs`` file (loaded with ``allow_pickle=False``).
    datadir : optional directory to look for image stacks in.
    read_poses : read ``alignments3D`` (False: a table without poses).

    Returns
    -------
    :class:`ParticleTable`. Stack paths are resolved against the ``.cs`` file's directory, its
    parent (cryoSPARC stores paths relative to the project directory, and job outputs sit in
    ``project/Jnn/``), the basename next to the ``.cs``, then ``datadir``. Poses are present
    when ``alignments3D/pose`` is (shifts zero if ``alignments3D/shift`` is absent).

    Raises
    ------
    InputError
        Not a NumPy structured array, pickled/object data, no ``blob/path``/``blob/idx``
        (e.g. a passthrough file), missing CTF fields, bad pixel size or box.
    """
    p = require_file(path, ".cs file")
    data = _load(p)
    names = set(data.dtype.names)
    if not {"blob/path", "blob/idx"} <= names:
        raise InputError(f"{p}: no blob/path and blob/idx fields (not a particle .cs file; a "
                         "passthrough file?)")
    if len(data) == 0:
        raise InputError(f"{p}: the particle table is empty")
    missing = [f for f in _CTF_FIELDS if f not in names]
    if missing:
        raise InputError(f"{p}: missing CTF fields {', '.join(missing)}")
    if "blob/psize_A" not in names:
        raise InputError(f"{p}: no pixel size (blob/psize_A)")
    apix = _field(p, data, "blob/psize_A")
    if (apix <= 0).any():
        raise InputError(f"{p}: pixel size must be positive (found {apix.min():g} A)")
    n = len(data)

    codes, uniques = pd.factorize(np.asarray(data["blob/path"]))
    raw_paths = [(u.decode("utf-8", "replace") if isinstance(u, bytes) else str(u)).strip().lstrip(">")
                 for u in uniques]
    if any(not r for r in raw_paths):
        raise InputError(f"{p}: empty blob/path")
    base = [p.parent.absolute(), p.parent.absolute().parent]
    file_ids: dict[str, int] = {}  # two names may resolve to the same file
    remap = np.array([file_ids.setdefault(resolve_stack_path(r, base, datadir), len(file_ids))
                      for r in raw_paths], dtype=np.int32)
    stack_ids = remap[codes]
    stack_files = tuple(file_ids)
    idx = np.asarray(data["blob/idx"]).astype(np.int64)
    if (idx < 0).any():
        raise InputError(f"{p}: negative blob/idx")

    if "blob/shape" in names:
        shapes = np.asarray(data["blob/shape"]).reshape(n, -1)
        uniq = np.unique(shapes, axis=0)
        if len(uniq) > 1:
            raise InputError(f"{p}: mixed box sizes in blob/shape; cryoai needs one box size")
        if uniq.shape[1] != 2 or uniq[0, 0] != uniq[0, 1]:
            raise InputError(f"{p}: images are not square (blob/shape {tuple(uniq[0])})")
        box = int(uniq[0, 0])
    else:
        from .mrc import read_header

        first = next((s for s in stack_files if os.path.isfile(s)), None)
        if first is None:
            raise InputError(f"{p}: no blob/shape and no image stack found (first: "
                             f"{stack_files[0]}); cannot tell the box size")
        box = read_header(first).box
    if box % 2:
        raise InputError(f"{p}: box size {box} is odd; cryoai needs even boxes")

    def optional(name: str) -> np.ndarray:
        return _field(p, data, name) if name in names else compact_column(0.0, n)

    rotations = shifts = None
    if read_poses and "alignments3D/pose" in names:
        pose = _field(p, data, "alignments3D/pose", np.float64).reshape(n, 3)
        rotations = pose_to_matrix(pose)
        if "alignments3D/shift" in names:
            shift_px = _field(p, data, "alignments3D/shift", np.float64).reshape(n, 2)
            shifts = -shift_px * apix[:, None]
        else:
            shifts = np.broadcast_to(np.float32(0), (n, 2))

    return ParticleTable(
        stack_files=stack_files,
        stack_ids=stack_ids,
        stack_indices=idx,
        box_px=box,
        pixel_size_a=apix,
        defocus_u_a=_field(p, data, "ctf/df1_A"),
        defocus_v_a=_field(p, data, "ctf/df2_A"),
        defocus_angle_rad=_field(p, data, "ctf/df_angle_rad"),
        voltage_kv=_field(p, data, "ctf/accel_kv"),
        cs_mm=_field(p, data, "ctf/cs_mm"),
        amplitude_contrast=_field(p, data, "ctf/amp_contrast"),
        phase_shift_rad=optional("ctf/phase_shift_rad"),
        bfactor_a2=optional("ctf/bfactor"),
        rotations=rotations,
        shifts_a=shifts,
        source_path=str(p.absolute()),
        source_format="cs",
    )
