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
  ``R = Rz(rot) @ Ry(tilt) @ Rz(psi)`` = scipy ``Rotation.from_euler("ZYZ", ..., degrees=True)``;
- shifts ``shifts_a = -origin`` from ``rlnOriginXAngst/YAngst``, or ``rlnOriginX/Y`` (pixels,
  RELION 3.0) times the pixel size; zeros when poses exist without origins; None when neither.

Writing produces RELION 3.1 (``data_optics`` + ``data_particles``), atomically.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation

from cryoai.errors import InputError

from ._util import atomic_path, one_line, require_file, resolve_stack_path
from .particles import ParticleTable

ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_ANGST_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGIN_PX_LABELS = ("rlnOriginX", "rlnOriginY")
#: Required CTF labels (after joining the optics table), and the names used in messages.
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
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------------- reading


def _as_frame(block) -> pd.DataFrame | None:
    """A STAR block as a DataFrame (a simple key/value block becomes one row)."""
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        return pd.DataFrame([block])
    return None


def _read_blocks(p: Path) -> dict[str, pd.DataFrame]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = starfile.read(p, always_dict=True)
    except Exception as exc:  # starfile raises many types on malformed input
        raise InputError(f"{p}: not a readable STAR file ({one_line(exc)})") from exc
    blocks = {}
    for name, block in (raw or {}).items():
        frame = _as_frame(block)
        if frame is not None:
            blocks[str(name)] = frame
    if not blocks:
        raise InputError(f"{p}: not a STAR file (no data_ blocks found)")
    return blocks


def _pick_tables(p: Path, blocks: dict[str, pd.DataFrame]
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(particle rows, optics table or None)."""
    optics = blocks.get("optics")
    if "particles" in blocks:
        return blocks["particles"], optics
    if optics is not None:
        raise InputError(f"{p}: has data_optics but no data_particles table")
    if len(blocks) == 1:
        return next(iter(blocks.values())), None
    with_names = [name for name, b in blocks.items() if "rlnImageName" in b.columns]
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


def _join_optics(p: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> pd.DataFrame:
    """Particle rows with the optics-group columns they lack copied in."""
    if optics is None or len(optics) == 0:
        return particles
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{p}: data_optics has no rlnOpticsGroup column")
    groups = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce")
    if groups.isna().any() or groups.duplicated().any():
        raise InputError(f"{p}: rlnOpticsGroup in data_optics must be distinct integers")
    opt = optics.assign(rlnOpticsGroup=groups.astype(np.int64)).set_index("rlnOpticsGroup")
    if "rlnOpticsGroup" in particles.columns:
        pg = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce")
        unknown = sorted(set(pg.dropna().astype(np.int64)) - set(opt.index))
        if pg.isna().any() or unknown:
            what = unknown[0] if unknown else "a non-integer value"
            raise InputError(f"{p}: particles use optics group {what}, which is not in data_optics")
        pg = pg.astype(np.int64)
    elif len(opt) == 1:
        pg = pd.Series(np.full(len(particles), opt.index[0]), index=particles.index)
    else:
        raise InputError(f"{p}: data_particles has no rlnOpticsGroup column but data_optics has "
                         f"{len(opt)} groups")
    joined = particles.copy()
    for col in opt.columns:
        if col not in joined.columns:
            joined[col] = pg.map(opt[col]).to_numpy()
    return joined


def _pixel_size(p: Path, rows: pd.DataFrame) -> np.ndarray:
    if "rlnImagePixelSize" in rows.columns:
        apix = _numeric(p, rows, "rlnImagePixelSize")
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(rows.columns):
        det = _numeric(p, rows, "rlnDetectorPixelSize")
        mag = _numeric(p, rows, "rlnMagnification")
        if (mag <= 0).any():
            raise InputError(f"{p}: rlnMagnification must be positive (found {mag.min():g})")
        apix = det * 1e4 / mag
    else:
        raise InputError(f"{p}: no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and "
                         "rlnMagnification)")
    if (apix <= 0).any():
        raise InputError(f"{p}: pixel size must be positive (found {apix.min():g} A)")
    return apix


def parse_image_names(p: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rlnImageName`` values ``"000012@path"`` into (0-based index, raw path).

    A name without ``@`` refers to the first (only) image of that file.
    """
    s = names.astype(str).str.strip()
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna().to_numpy()
    raw_paths = np.where(has_at, parts[1].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy()
    bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.floor(numbers))
    bad |= np.array([not str(x) for x in raw_paths])
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{p}: bad rlnImageName '{s.iloc[row]}' in particle row {row + 1} "
                         "(expected NNNNNN@stack.mrcs)")
    return numbers.astype(np.int64) - 1, raw_paths.astype(str)


def _box_size(p: Path, rows: pd.DataFrame, stack_paths: np.ndarray) -> int:
    if "rlnImageSize" in rows.columns:
        sizes = np.unique(_numeric(p, rows, "rlnImageSize"))
        if sizes.size > 1:
            listed = ", ".join(f"{s:g}" for s in sizes[:5])
            raise InputError(f"{p}: mixed box sizes {listed} in rlnImageSize; cryoai needs one "
                             "box size")
        box = int(sizes[0])
    else:
        from .mrc import read_header

        first = next((s for s in dict.fromkeys(stack_paths) if os.path.isfile(s)), None)
        if first is None:
            raise InputError(f"{p}: no rlnImageSize and no image stack found (first: "
                             f"{stack_paths[0]}); cannot tell the box size")
        info = read_header(first)
        box = info.box
    if box % 2:
        raise InputError(f"{p}: box size {box} is odd; cryoai needs even boxes")
    if box < 2:
        raise InputError(f"{p}: invalid box size {box}")
    return box


def read_star(path: str | os.PathLike, datadir: str | os.PathLike | None = None
              ) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    Parameters
    ----------
    path : ``.star`` file.
    datadir : optional directory where image stacks are looked up when they are neither at
        the path written in ``rlnImageName`` (relative to the STAR file) nor next to the STAR.

    Returns
    -------
    :class:`ParticleTable`, with ``source`` the original particle rows and ``optics`` the
    original optics table (3.1) for export. Image stacks are not opened (except one header
    when the box size is not in the metadata); see :func:`cryoai.io.validate_images`.

    Raises
    ------
    InputError
        Not a STAR file, no particle table, no rlnImageName, missing CTF columns, no or
        non-positive pixel size, mixed or odd box sizes, malformed values.
    """
    p = require_file(path, "STAR file")
    blocks = _read_blocks(p)
    particles, optics = _pick_tables(p, blocks)
    if "rlnImageName" not in particles.columns:
        raise InputError(f"{p}: no rlnImageName column in the particle table")
    if len(particles) == 0:
        raise InputError(f"{p}: the particle table is empty")
    particles = particles.reset_index(drop=True)
    rows = _join_optics(p, particles, optics)

    missing = [label for label in CTF_LABELS if label not in rows.columns]
    if missing:
        raise InputError(f"{p}: missing CTF columns {', '.join(missing)}")
    ctf = {label: _numeric(p, rows, label) for label in CTF_LABELS}
    n = len(rows)

    def optional(label: str) -> np.ndarray:
        return _numeric(p, rows, label) if label in rows.columns else np.zeros(n)

    apix = _pixel_size(p, rows)

    stack_indices, raw_paths = parse_image_names(p, rows["rlnImageName"])
    base = [p.parent.absolute()]
    resolved = {raw: resolve_stack_path(raw, base, datadir) for raw in dict.fromkeys(raw_paths)}
    stack_paths = np.array([resolved[r] for r in raw_paths], dtype=object)
    box = _box_size(p, rows, stack_paths)

    rotations = None
    if all(label in rows.columns for label in ANGLE_LABELS):
        angles = np.stack([_numeric(p, rows, label) for label in ANGLE_LABELS], axis=1)
        rotations = euler_deg_to_matrix(angles)
    shifts = None
    if all(label in rows.columns for label in ORIGIN_ANGST_LABELS):
        origin_a = np.stack([_numeric(p, rows, label) for label in ORIGIN_ANGST_LABELS], axis=1)
        shifts = -origin_a
    elif all(label in rows.columns for label in ORIGIN_PX_LABELS):
        origin_px = np.stack([_numeric(p, rows, label) for label in ORIGIN_PX_LABELS], axis=1)
        shifts = -origin_px * apix[:, None]
    elif rotations is not None:
        shifts = np.zeros((n, 2))

    return ParticleTable(
        stack_paths=stack_paths,
        stack_indices=stack_indices,
        box_px=box,
        pixel_size_a=apix,
        defocus_u_a=ctf["rlnDefocusU"],
        defocus_v_a=ctf["rlnDefocusV"],
        defocus_angle_rad=np.deg2rad(ctf["rlnDefocusAngle"]),
        voltage_kv=ctf["rlnVoltage"],
        cs_mm=ctf["rlnSphericalAberration"],
        amplitude_contrast=ctf["rlnAmplitudeContrast"],
        phase_shift_rad=np.deg2rad(optional("rlnPhaseShift")),
        bfactor_a2=optional("rlnCtfBfactor"),
        rotations=rotations,
        shifts_a=shifts,
        source=particles,
        optics=None if optics is None else optics.reset_index(drop=True),
        source_path=str(p.absolute()),
    )


def euler_deg_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, (n, 3), to poses ``Rz(rot) Ry(tilt) Rz(psi)``, (n, 3, 3).

    scipy's intrinsic ``"ZYZ"`` is exactly this product (CONVENTIONS.md, Rotations).
    """
    return Rotation.from_euler("ZYZ", np.asarray(angles_deg, dtype=np.float64),
                               degrees=True).as_matrix().reshape(-1, 3, 3)


def matrix_to_euler_deg(rotations: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_deg_to_matrix`: (n, 3, 3) -> (rot, tilt, psi) degrees, (n, 3).

    ``tilt`` in [0, 180]; at the gimbal lock scipy puts the whole in-plane angle in one of
    rot/psi, which gives back the same matrix.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Gimbal lock detected"
        return Rotation.from_matrix(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
                                    ).as_euler("ZYZ", degrees=True)


# ----------------------------------------------------------------------------------- writing


def _image_names(table: ParticleTable, out_dir: Path) -> list[str]:
    rel: dict[str, str] = {}
    for s in dict.fromkeys(table.stack_paths):
        try:
            rel[s] = os.path.relpath(s, out_dir)
        except ValueError:  # different drive (Windows)
            rel[s] = str(s)
    return [f"{int(i) + 1:06d}@{rel[s]}" for i, s in
            zip(table.stack_indices, table.stack_paths, strict=True)]


def _optics_key_columns(table: ParticleTable) -> np.ndarray:
    return np.stack([table.pixel_size_a, table.voltage_kv, table.cs_mm,
                     table.amplitude_contrast], axis=1)


def _original_optics_fit(table: ParticleTable, rows: pd.DataFrame) -> bool:
    """Whether the table's optics (per particle) still agree with its original optics table."""
    optics = table.optics
    if optics is None or "rlnOpticsGroup" not in rows.columns:
        return False
    if "rlnOpticsGroup" not in optics.columns:
        return False
    try:
        joined = _join_optics(Path("<table>"), rows[["rlnOpticsGroup"]], optics)
    except InputError:
        return False
    checks = {
        "rlnVoltage": table.voltage_kv,
        "rlnSphericalAberration": table.cs_mm,
        "rlnAmplitudeContrast": table.amplitude_contrast,
        "rlnImagePixelSize": table.pixel_size_a,
    }
    for label, values in checks.items():
        if label not in joined.columns:
            return False
        col = pd.to_numeric(joined[label], errors="coerce").to_numpy(dtype=np.float64)
        if not np.allclose(col, values, rtol=1e-6, atol=1e-9):
            return False
    if "rlnImageSize" in joined.columns:
        sizes = pd.to_numeric(joined["rlnImageSize"], errors="coerce").to_numpy()
        if not (sizes == table.box_px).all():
            return False
    return True


def _build_optics(table: ParticleTable) -> tuple[pd.DataFrame, np.ndarray]:
    keys = _optics_key_columns(table)
    unique, group_of = np.unique(keys, axis=0, return_inverse=True)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(unique) + 1, dtype=np.int64),
        "rlnOpticsGroupName": [f"opticsGroup{i}" for i in range(1, len(unique) + 1)],
        "rlnAmplitudeContrast": unique[:, 3],
        "rlnSphericalAberration": unique[:, 2],
        "rlnVoltage": unique[:, 1],
        "rlnImagePixelSize": unique[:, 0],
        "rlnImageSize": np.full(len(unique), table.box_px, dtype=np.int64),
        "rlnImageDimensionality": np.full(len(unique), 2, dtype=np.int64),
    })
    return optics, group_of.reshape(-1).astype(np.int64) + 1


def _source_rows(table: ParticleTable, template: ParticleTable | None
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    src = table.source
    optics = table.optics
    if src is None and template is not None and template.source is not None:
        if len(template.source) != len(table):
            raise ValueError(f"template has {len(template.source)} rows, table has {len(table)}")
        src, optics = template.source, template.optics
    if src is None or len(src) != len(table) or "blob/path" in src.columns:
        # No STAR rows to carry over (new table, or a cryoSPARC table whose fields are not
        # STAR labels).
        return pd.DataFrame(index=pd.RangeIndex(len(table))), None
    keep = [c for c in src.columns if isinstance(c, str) and _LABEL_RE.match(c)]
    return src[keep].reset_index(drop=True).copy(), optics


def write_star(path: str | os.PathLike, table: ParticleTable, *,
               template: ParticleTable | None = None) -> None:
    """Write ``table`` as a RELION 3.1 particle STAR file (atomically).

    Parameters
    ----------
    path : output ``.star``.
    table : the particles.
    template : optional table whose original rows (``source``/``optics``) are carried over
        when ``table`` has none of its own (same number of rows, same order).

    Notes
    -----
    - Every column of the original particle rows is kept; ``rlnImageName`` (``NNNNNN@stack``,
      the stack path relative to the output directory), the CTF columns and, when the table
      has them, ``rlnAngleRot/Tilt/Psi`` (degrees) and ``rlnOriginXAngst/YAngst``
      (``= -shifts_a``) are overwritten or added. 3.0-only columns (``rlnOriginX/Y`` in pixels
      and the per-particle optics labels such as ``rlnVoltage``, ``rlnMagnification``) move to
      their 3.1 form.
    - ``data_optics`` is the original optics table when it still matches the particles' CTF
      and pixel size, else one group per distinct (pixel size, voltage, Cs, amplitude
      contrast), all with ``rlnImageSize = box_px``.
    """
    out = Path(path)
    n = len(table)
    rows, optics = _source_rows(table, template)

    kept_optics = False
    if optics is not None and _original_optics_fit(table, rows):
        optics = optics.copy()
        if "rlnImageSize" not in optics.columns:
            optics["rlnImageSize"] = table.box_px
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = 2
        kept_optics = True
    else:
        optics, groups = _build_optics(table)
    drop = [c for c in OPTICS_LEVEL_LABELS if c in rows.columns]
    drop += [c for c in ORIGIN_PX_LABELS if c in rows.columns]
    if table.rotations is None and all(c in rows.columns for c in ANGLE_LABELS):
        drop += list(ANGLE_LABELS)  # the poses were removed from the table
    if table.shifts_a is None:
        drop += [c for c in ORIGIN_ANGST_LABELS if c in rows.columns]
    rows = rows.drop(columns=drop)

    out_dir = out.parent.absolute()
    rows["rlnImageName"] = _image_names(table, out_dir)
    if not kept_optics:
        rows["rlnOpticsGroup"] = groups
    rows["rlnDefocusU"] = table.defocus_u_a
    rows["rlnDefocusV"] = table.defocus_v_a
    rows["rlnDefocusAngle"] = np.rad2deg(table.defocus_angle_rad)
    rows["rlnPhaseShift"] = np.rad2deg(table.phase_shift_rad)
    rows["rlnCtfBfactor"] = table.bfactor_a2
    if table.rotations is not None:
        angles = matrix_to_euler_deg(table.rotations)
        for k, label in enumerate(ANGLE_LABELS):
            rows[label] = angles[:, k]
    if table.shifts_a is not None:
        shifts = np.asarray(table.shifts_a, dtype=np.float64).reshape(n, 2)
        rows["rlnOriginXAngst"] = -shifts[:, 0]
        rows["rlnOriginYAngst"] = -shifts[:, 1]

    with atomic_path(out, suffix=".star") as tmp:
        starfile.write({"optics": optics, "particles": rows}, tmp, float_format="%.10g")
