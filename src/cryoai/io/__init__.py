"""File formats: MRC, RELION STAR 3.0/3.1, cryoSPARC .cs, and the one particle table.

This is the only layer that knows file conventions (degrees, RELION origin signs, 1-based
stack indices, optics groups).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryoai.errors import InputError

from ._util import IMAGE_PATHS, atomic_path, require_file, write_json_atomic, write_text_atomic
from .cryosparc import read_cs, write_cs
from .images import ImageSource, resolve_stacks, validate_images
from .mrc import (
    StackWriter,
    check_finite,
    open_stack,
    read_header,
    read_stack_images,
    read_volume,
    write_stack,
    write_volume,
)
from .particles import CTF_FIELDS, ParticleTable
from .star import read_star, write_star

__all__ = [
    "CTF_FIELDS",
    "IMAGE_PATHS",
    "ImageSource",
    "ParticleTable",
    "StackWriter",
    "atomic_path",
    "check_finite",
    "load_particles",
    "open_stack",
    "read_cs",
    "read_header",
    "read_stack_images",
    "read_star",
    "read_volume",
    "resolve_stacks",
    "validate_images",
    "write_json_atomic",
    "write_stack",
    "write_cs",
    "write_star",
    "write_text_atomic",
    "write_volume",
]

_READERS = {".star": read_star, ".cs": read_cs}


def load_particles(path: str | os.PathLike, datadir: str | os.PathLike | None = None, *,
                   read_poses: bool = True) -> ParticleTable:
    """Read a particle file, choosing the reader by suffix (``.star`` or ``.cs``).

    Parameters
    ----------
    path : particle metadata file.
    datadir : optional directory to look for image stacks in, after the current folder (the
        project folder) and the file's own (see :func:`read_star`, :func:`read_cs`).
    read_poses : read the poses the file holds (False: skip them, e.g. for training, which
        does not use them; saves 44 bytes per particle).

    Returns
    -------
    :class:`ParticleTable` (images are not read; use :class:`ImageSource`).

    Raises
    ------
    InputError
        Missing file, unknown suffix, or any problem the reader finds.
    """
    p = require_file(path, "particle file")
    reader = _READERS.get(Path(p).suffix.lower())
    if reader is None:
        raise InputError(f"{p}: unknown particle file type '{p.suffix}' (expected .star or .cs)")
    if datadir is not None and not Path(datadir).is_dir():
        raise InputError(f"{datadir}: data directory not found")
    return reader(p, datadir=datadir, read_poses=read_poses)
