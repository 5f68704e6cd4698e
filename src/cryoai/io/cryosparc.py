"""cryoSPARC particle files (``.cs``: a NumPy structured array saved with ``np.save``).

Fields used (per particle):

==========================  ==============================================================
``blob/path``               image stack (bytes; a leading ``>`` means "relative to the
                            project directory" and is stripped)
``blob/idx``                0-based index in the stack
``blob/shape``              (ny, nx) image size, optional (else read from the stack)
``blob/psize_A``            pixel size, Angstrom
``blob/sign``               -1: the protein is dark in the images; +1: bright (optional,
                            kept for the writer)
``ctf/accel_kv``            voltage, kV
``ctf/cs_mm``               spherical aberration, mm
``ctf/amp_contrast``        amplitude contrast
``ctf/df1_A, ctf/df2_A``    defocus U, V, Angstrom (RELION's rlnDefocusU/V)
``ctf/df_angle_rad``        astigmatism angle, radians (RELION's rlnDefocusAngle in radians)
``ctf/phase_shift_rad``     phase shift, radians (optional, default 0)
``ctf/bfactor``             CTF B-factor, A^2 (optional, default 0)
``ctf/exp_group_id``        exposure group (optional; RELION's optics group)
``alignments3D/pose``       rotation vector (axis * angle, radians), optional
``alignments3D/shift``      in-plane shift, pixels, optional
``alignments3D/split``      half set, 0 or 1 (written only)
==========================  ==============================================================

Pose convention (verified, see :func:`pose_to_matrix`): cryoai's pose is
``R = axis_angle_to_matrix(pose)`` (``exp([pose]_x)``, Rodrigues; scipy's
``Rotation.from_rotvec(pose).as_matrix()``); RELION's own matrix is its transpose.
Shift convention: ``alignments3D/shift`` has the sign of RELION's origin, in pixels, so
``shifts_a = -shift * blob/psize_A``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoai.errors import InputError
from cryoai.physics.rotations import axis_angle_to_matrix, matrix_to_axis_angle

from ._util import (
    box_from_first_stack,
    cs_base_dirs,
    one_line,
    require_file,
    resolve_stack_path,
    stack_names_to_write,
)
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
    """CryoSPARC ``alignments3D/pose`` (n, 3) rotation vectors -> cryoai poses (n, 3, 3).

    ``R = axis_angle_to_matrix(pose)`` (Rodrigues' formula ``I + sin(t) K + (1 - cos(t)) K^2``
    with ``t = |pose|`` and ``K`` the cross-product matrix of the unit axis; the same as scipy's
    ``Rotation.from_rotvec(pose).as_matrix()``, written ``from_rotvec`` below), in float64.

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
    pose64 = torch.from_numpy(np.array(pose, dtype=np.float64).reshape(-1, 3))  # a copy
    return axis_angle_to_matrix(pose64).numpy()


def matrix_to_pose(rotations: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_to_matrix`: (n, 3, 3) -> (n, 3) rotation vectors, float64.

    :func:`~cryoai.physics.rotations.matrix_to_axis_angle` (angle in [0, pi]; scipy's
    ``as_rotvec``). ``rotations`` must be rotations: unlike scipy, matrices that are not
    orthonormal to 1e-12 (float32 poses) are not projected onto the nearest rotation first, so
    there the result differs from scipy's by about the matrices' own error (1e-7).
    """
    rot64 = torch.from_numpy(np.array(rotations, dtype=np.float64).reshape(-1, 3, 3))  # a copy
    return matrix_to_axis_angle(rot64).numpy()


#: Records read at a time.
CHUNK_RECORDS = 65536


class _Records:
    """A ``.cs`` file (NumPy ``.npy`` format, a 1D structured array) read in chunks of records,
    so that a file of millions of particles with dozens of fields is never held whole.
    """

    def __init__(self, p: Path):
        self.p = p
        try:
            with open(p, "rb") as f:
                if f.read(4) == b"PK\x03\x04":
                    raise InputError(f"{p}: is an .npz archive, not a cryoSPARC .cs file")
                f.seek(0)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise InputError(f"{p}: NumPy file format version {version} is not supported")
                self.offset = f.tell()
        except InputError:
            raise
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                raise InputError(f"{p}: holds pickled Python objects, which cryoai refuses to load "
                                 "(not a cryoSPARC .cs file)") from exc
            raise InputError(f"{p}: not a cryoSPARC .cs file ({one_line(exc)})") from exc
        except (OSError, EOFError) as exc:
            raise InputError(f"{p}: not a cryoSPARC .cs file ({one_line(exc)})") from exc
        if dtype.names is None or len(shape) != 1:
            raise InputError(f"{p}: not a cryoSPARC .cs file (not a 1D table of named fields)")
        if dtype.hasobject:
            raise InputError(f"{p}: holds Python objects, which cryoai refuses to load")
        self.dtype, self.n = dtype, int(shape[0])
        size = os.path.getsize(p)
        if size < self.offset + self.n * dtype.itemsize:
            raise InputError(f"{p}: truncated ({size} bytes, the header announces "
                             f"{self.offset + self.n * dtype.itemsize})")
        self.names = set(dtype.names)

    def chunks(self):
        """Yield (first record, structured array of up to CHUNK_RECORDS records)."""
        with open(self.p, "rb") as f:
            f.seek(self.offset)
            for start in range(0, self.n, CHUNK_RECORDS):
                count = min(CHUNK_RECORDS, self.n - start)
                yield start, np.fromfile(f, dtype=self.dtype, count=count)


def _finite(p: Path, values: np.ndarray, name: str) -> np.ndarray:
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
    :class:`ParticleTable`. Relative stack paths are looked up from the current folder (the
    project folder: cryoSPARC stores paths relative to it), the ``.cs`` file's folder, its
    parent (job outputs sit in ``project/Jnn/``), the basename next to the ``.cs``, then
    ``datadir``; the names as written are kept (``stack_names``) for the writers. Poses are
    present when ``alignments3D/pose`` is (shifts zero if ``alignments3D/shift`` is absent).
    ``blob/sign`` and ``ctf/exp_group_id``, where present, become ``image_sign`` and
    ``optics_group``.

    Raises
    ------
    InputError
        Not a NumPy structured array, pickled/object data, no ``blob/path``/``blob/idx``
        (e.g. a passthrough file), missing CTF fields, bad pixel size or box.
    """
    p = require_file(path, ".cs file")
    records = _Records(p)
    names = records.names
    if not {"blob/path", "blob/idx"} <= names:
        raise InputError(f"{p}: no blob/path and blob/idx fields (not a particle .cs file; a "
                         "passthrough file?)")
    n = records.n
    if n == 0:
        raise InputError(f"{p}: the particle table is empty")
    missing = [f for f in _CTF_FIELDS if f not in names]
    if missing:
        raise InputError(f"{p}: missing CTF fields {', '.join(missing)}")
    if "blob/psize_A" not in names:
        raise InputError(f"{p}: no pixel size (blob/psize_A)")
    with_poses = read_poses and "alignments3D/pose" in names
    wanted = {name: (n,) for name in (*_CTF_FIELDS, "blob/psize_A", "ctf/phase_shift_rad",
                                     "ctf/bfactor", "blob/sign") if name in names}
    if with_poses:
        wanted["alignments3D/pose"] = (n, 3)
        if "alignments3D/shift" in names:
            wanted["alignments3D/shift"] = (n, 2)
    columns = {name: np.empty(shape, dtype=np.float64 if name.startswith("align") else np.float32)
               for name, shape in wanted.items()}
    stack_codes = np.empty(n, dtype=np.int32)
    idx = np.empty(n, dtype=np.int32)
    raw_ids: dict[bytes | str, int] = {}
    shapes: set[tuple[int, ...]] = set()
    micrograph_uid = np.empty(n, dtype=np.uint64) if "location/micrograph_uid" in names else None
    exp_group = np.empty(n, dtype=np.int64) if "ctf/exp_group_id" in names else None
    for start, chunk in records.chunks():
        sl = slice(start, start + len(chunk))
        for name, arr in columns.items():
            arr[sl] = np.asarray(chunk[name]).reshape((len(chunk), *wanted[name][1:]))
        codes, uniques = pd.factorize(np.asarray(chunk["blob/path"]))
        ids = np.array([raw_ids.setdefault(u, len(raw_ids)) for u in uniques], dtype=np.int32)
        stack_codes[sl] = ids[codes]
        blob_idx = np.asarray(chunk["blob/idx"]).astype(np.int64)
        if (blob_idx < 0).any():
            raise InputError(f"{p}: negative blob/idx")
        idx[sl] = blob_idx
        if micrograph_uid is not None:
            micrograph_uid[sl] = np.asarray(chunk["location/micrograph_uid"]).astype(np.uint64)
        if exp_group is not None:
            exp_group[sl] = np.asarray(chunk["ctf/exp_group_id"]).astype(np.int64)
        if "blob/shape" in names:
            shapes.update(map(tuple, np.unique(np.asarray(chunk["blob/shape"]).reshape(len(chunk), -1),
                                               axis=0).tolist()))
    for name, arr in columns.items():
        _finite(p, arr, name)
    apix = columns["blob/psize_A"]
    if (apix <= 0).any():
        raise InputError(f"{p}: pixel size must be positive (found {apix.min():g} A)")

    raw_paths = [(u.decode("utf-8", "replace") if isinstance(u, bytes) else str(u)).strip().lstrip(">")
                 for u in raw_ids]
    if any(not r for r in raw_paths):
        raise InputError(f"{p}: empty blob/path")
    base, folder = cs_base_dirs(p), p.parent.absolute()
    resolved = [resolve_stack_path(r, base, datadir, basename_dir=folder) for r in raw_paths]
    file_ids: dict[str, int] = {}  # two names may resolve to the same file
    remap = np.array([file_ids.setdefault(r, len(file_ids)) for r in resolved], dtype=np.int32)
    stack_names: dict[str, str] = {}
    for raw, r in zip(raw_paths, resolved, strict=True):
        stack_names.setdefault(r, raw)
    stack_ids = remap[stack_codes]
    stack_files = tuple(file_ids)

    if shapes:
        if len(shapes) > 1:
            raise InputError(f"{p}: mixed box sizes in blob/shape; cryoai needs one box size")
        shape = next(iter(shapes))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise InputError(f"{p}: images are not square (blob/shape {shape})")
        box = int(shape[0])
    else:
        box = box_from_first_stack(p, stack_files, "blob/shape")
    if box % 2:
        raise InputError(f"{p}: box size {box} is odd; cryoai needs even boxes")

    def optional(name: str) -> np.ndarray:
        return columns[name] if name in columns else compact_column(0.0, n)

    rotations = shifts = None
    if with_poses:
        rotations = pose_to_matrix(columns.pop("alignments3D/pose")).astype(np.float32)
        if "alignments3D/shift" in columns:
            shifts = -columns.pop("alignments3D/shift") * apix[:, None]
        else:
            shifts = np.broadcast_to(np.float32(0), (n, 2))

    return ParticleTable(
        stack_files=stack_files,
        stack_ids=stack_ids,
        stack_indices=idx,
        box_px=box,
        pixel_size_a=apix,
        defocus_u_a=columns["ctf/df1_A"],
        defocus_v_a=columns["ctf/df2_A"],
        defocus_angle_rad=columns["ctf/df_angle_rad"],
        voltage_kv=columns["ctf/accel_kv"],
        cs_mm=columns["ctf/cs_mm"],
        amplitude_contrast=columns["ctf/amp_contrast"],
        phase_shift_rad=optional("ctf/phase_shift_rad"),
        bfactor_a2=optional("ctf/bfactor"),
        rotations=rotations,
        shifts_a=shifts,
        micrograph_ids=None if micrograph_uid is None else np.unique(micrograph_uid, return_inverse=True)[1],
        optics_group=exp_group,
        stack_names=stack_names,
        image_sign=columns.get("blob/sign"),
        source_path=str(p.absolute()),
        source_format="cs",
    )


def write_cs(path: str | os.PathLike, table: ParticleTable, *, poses=None,
             chunk_records: int = CHUNK_RECORDS, half_set: np.ndarray | None = None,
             sign: float | None = None, image_paths: str = "as_read",
             latent: np.ndarray | None = None) -> None:
    """Write ``table`` as a cryoSPARC particle ``.cs`` file (atomically, streaming).

    Written by hand rather than through cryosparc-tools' ``Dataset``, which holds the whole
    table in memory: the ``.npy`` header is written first and the records block by block, so a
    million particles take no more memory than ``chunk_records``. The file is read back by
    cryoSPARC's own toolkit (tested) and by :func:`read_cs`.

    Parameters
    ----------
    path : output ``.cs``.
    table : the particles (stacks, CTF, pixel size; box from ``table.box_px``).
    poses : optional :class:`cryoai.physics.poses.Poses` of every row, or an iterable of
        ``(rotations (k, 3, 3), shifts_a (k, 2) or None)`` blocks in row order, written
        instead of the table's own poses.
    chunk_records : records formatted at a time.
    half_set : optional (N,) ints, 0 or 1: the half set each particle went to, written as
        ``alignments3D/split`` (with the poses).
    sign : ``blob/sign`` of every particle: -1 when the protein is dark in the stacks (as
        extracted from cryo-EM micrographs, RELION's and cryoSPARC's particles), +1 when it is
        bright. None: the table's ``image_sign`` (read from a ``.cs``) where it has one, else -1.
    image_paths : how ``blob/path`` names the stacks: ``"as_read"`` (default) keeps the names
        of the file the table was read from (relative to the cryoSPARC or RELION project
        folder), where they lead to the same stacks from the output (looked up from the
        current folder, the output's folder and its parent); others relative to the output's
        folder. ``"relative"``: all relative to the output's folder. ``"absolute"``: absolute
        paths.

    Notes
    -----
    Fields: ``uid`` (the row number + 1), ``blob/path`` (the stack, named as ``image_paths``
    says), ``blob/idx``, ``blob/shape``, ``blob/psize_A``, ``blob/sign``, the ``ctf/*`` fields
    of :func:`read_cs`, ``ctf/exp_group_id`` (the table's optics group, else 1), and, when
    there are poses, ``alignments3D/pose`` (rotation vectors, :func:`matrix_to_pose`),
    ``alignments3D/shift`` (pixels, the sign of RELION's origin: ``-shifts_a / psize``),
    ``alignments3D/psize_A`` and, with ``half_set``, ``alignments3D/split``.

    Raises
    ------
    ValueError
        ``half_set`` of the wrong length or with values other than 0 and 1, ``half_set``
        without poses, ``sign`` not -1 or +1, an unknown ``image_paths``, ``latent`` not (N, D).
    """
    from ..physics.poses import Poses
    from ._util import atomic_path
    from .star_write import _PoseChunks, half_set_column

    out = Path(path)
    n = len(table)
    if isinstance(poses, Poses):
        poses = poses.chunks()
    with_poses = poses is not None or table.has_poses
    if half_set is not None:
        if not with_poses:
            raise ValueError("half_set is written in alignments3D, which needs poses")
        half_set = half_set_column(half_set, n)
    if sign is not None and sign not in (-1, 1):
        raise ValueError(f"sign must be -1 (dark protein) or +1 (bright), got {sign}")
    if latent is not None:
        latent = np.asarray(latent, dtype=np.float32)
        if latent.ndim != 2 or len(latent) != n:
            raise ValueError(f"latent must be ({n}, D), got {latent.shape}")
    signs = (compact_column(float(sign), n) if sign is not None else
             table.image_sign if table.image_sign is not None else compact_column(-1.0, n))
    groups = table.optics_group if table.optics_group is not None else compact_column(1, n, np.uint32)
    names = stack_names_to_write(table.stack_files, table.stack_names, out, image_paths, cs_base_dirs(out))
    paths = np.array([name.encode() for name in names])
    fields = [("uid", "<u8"), ("blob/path", paths.dtype.str), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
              ("ctf/exp_group_id", "<u4"),
              ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
              ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
              ("ctf/phase_shift_rad", "<f4"), ("ctf/bfactor", "<f4")]
    if with_poses:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4")]
        if half_set is not None:
            fields += [("alignments3D/split", "<u4")]
    for k in range(0 if latent is None else latent.shape[1]):
        fields += [(f"components_mode_{k}/component", "<u4"), (f"components_mode_{k}/value", "<f4")]
    dtype = np.dtype(fields)
    pose_chunks = _PoseChunks(poses) if poses is not None else None
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, n, chunk_records):
            sl = slice(start, min(start + chunk_records, n))
            k = sl.stop - start
            rec = np.zeros(k, dtype=dtype)
            rec["uid"] = np.arange(start + 1, sl.stop + 1, dtype=np.uint64)
            rec["blob/path"] = paths[table.stack_ids[sl]]
            rec["blob/idx"] = table.stack_indices[sl]
            rec["blob/shape"] = table.box_px
            apix = np.asarray(table.pixel_size_a[sl], dtype=np.float32)
            rec["blob/psize_A"] = apix
            rec["blob/sign"] = signs[sl]
            rec["ctf/exp_group_id"] = groups[sl]
            for name, values in (("ctf/accel_kv", table.voltage_kv), ("ctf/cs_mm", table.cs_mm),
                                 ("ctf/amp_contrast", table.amplitude_contrast),
                                 ("ctf/df1_A", table.defocus_u_a), ("ctf/df2_A", table.defocus_v_a),
                                 ("ctf/df_angle_rad", table.defocus_angle_rad),
                                 ("ctf/phase_shift_rad", table.phase_shift_rad),
                                 ("ctf/bfactor", table.bfactor_a2)):
                rec[name] = values[sl]
            if with_poses:
                if pose_chunks is not None:
                    rot, shifts_a = pose_chunks.take(k)
                else:
                    rot = table.rotations[sl]
                    shifts_a = table.shifts_a[sl] if table.has_shifts else np.zeros((k, 2))
                rec["alignments3D/pose"] = matrix_to_pose(rot)
                rec["alignments3D/shift"] = -np.asarray(shifts_a, dtype=np.float64) / apix[:, None]
                rec["alignments3D/psize_A"] = apix
                if half_set is not None:
                    rec["alignments3D/split"] = half_set[sl]
            for j in range(0 if latent is None else latent.shape[1]):
                rec[f"components_mode_{j}/component"] = j
                rec[f"components_mode_{j}/value"] = latent[sl, j]
            rec.tofile(f)
        if pose_chunks is not None:
            pose_chunks.finish()
