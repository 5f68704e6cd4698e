"""Helpers shared by the file-format modules: one-line errors, atomic writes, path lookup."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryoai.errors import InputError, OutputError


def one_line(text: object, limit: int = 300) -> str:
    """``str(text)`` squeezed onto one line (newlines and runs of blanks become one space)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def paths_relative_to(paths: Sequence[str], folder: str | os.PathLike) -> list[str]:
    """``paths`` as written in a file saved in ``folder``: relative to it (so that a run
    directory moved with its stacks still reads), or absolute where no relative path exists
    (another drive on Windows).
    """
    base = Path(folder).absolute()
    out = []
    for path in paths:
        try:
            out.append(os.path.relpath(path, base))
        except ValueError:
            out.append(str(path))
    return out


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path`, or :class:`InputError` if it is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a {what}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: {what} is not readable (permission denied)")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic: a
    reader never sees a half-written file, and a failure leaves any previous file untouched.
    Errors of the file system are raised as :class:`OutputError` (one line).
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{target}: output directory {parent} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.",
                                        suffix=suffix + ".tmp")
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({one_line(exc.strerror or exc)})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{target}: cannot write ({one_line(exc.strerror or exc)})") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    import json

    write_text_atomic(path, json.dumps(obj, indent=indent, default=str))


def stack_candidates(raw: str, base_dirs: Sequence[Path], datadir: str | os.PathLike | None
                     ) -> list[Path]:
    """Where an image stack named ``raw`` in a metadata file may be, in the order tried.

    ``raw`` itself if absolute; otherwise ``base / raw`` for each base directory; then the
    basename in the first base directory; then ``datadir / raw`` and ``datadir / basename``.
    """
    p = Path(raw)
    out: list[Path] = []
    if p.is_absolute():
        out.append(p)
    else:
        out.extend(base / p for base in base_dirs)
    if base_dirs:
        out.append(base_dirs[0] / p.name)
    if datadir is not None:
        d = Path(datadir)
        if not p.is_absolute():
            out.append(d / p)
        out.append(d / p.name)
    seen: set[str] = set()
    unique = []
    for c in out:
        key = os.path.normpath(os.path.abspath(c))
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


def resolve_stack_path(raw: str, base_dirs: Sequence[Path],
                       datadir: str | os.PathLike | None) -> str:
    """The first existing candidate of :func:`stack_candidates`, else the first candidate.

    A missing stack is not an error here: it is reported when images are read or validated.
    """
    candidates = stack_candidates(raw, base_dirs, datadir)
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[0])


def box_from_first_stack(p: Path, stack_files: Sequence[str], missing_label: str) -> int:
    """The image size in the header of the first existing stack of ``stack_files``, for a
    metadata file ``p`` that lacks ``missing_label``; :class:`InputError` if none exists.
    """
    from .mrc import read_header

    first = next((s for s in stack_files if os.path.isfile(s)), None)
    if first is None:
        raise InputError(f"{p}: no {missing_label} and no image stack found (first: "
                         f"{stack_files[0]}); cannot tell the box size")
    return read_header(first).box
