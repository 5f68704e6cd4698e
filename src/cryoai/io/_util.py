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


def star_base_dirs(path: str | os.PathLike) -> list[Path]:
    """Where the relative stack names of a STAR file are looked up, in order: the current
    folder (RELION writes ``rlnImageName`` relative to the project folder, from which its jobs
    run), then the STAR file's own folder.
    """
    return [Path.cwd(), Path(path).parent.absolute()]


def cs_base_dirs(path: str | os.PathLike) -> list[Path]:
    """Where the relative stack names of a cryoSPARC ``.cs`` file are looked up, in order: the
    current folder, the ``.cs`` file's folder, and its parent (cryoSPARC writes ``blob/path``
    relative to the project folder, and a job's files sit in ``project/Jnn/``).
    """
    folder = Path(path).parent.absolute()
    return [Path.cwd(), folder, folder.parent]


def stack_candidates(raw: str, base_dirs: Sequence[Path], datadir: str | os.PathLike | None, *,
                     basename_dir: Path | None = None) -> list[Path]:
    """Where an image stack named ``raw`` in a metadata file may be, in the order tried.

    ``raw`` itself if absolute; otherwise ``base / raw`` for each base directory
    (:func:`star_base_dirs`, :func:`cs_base_dirs`); then the basename in ``basename_dir`` (the
    metadata file's folder); then ``datadir / raw`` and ``datadir / basename``.
    """
    p = Path(raw)
    out: list[Path] = []
    if p.is_absolute():
        out.append(p)
    else:
        out.extend(base / p for base in base_dirs)
    if basename_dir is not None:
        out.append(basename_dir / p.name)
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


def resolve_stack_path(raw: str, base_dirs: Sequence[Path], datadir: str | os.PathLike | None, *,
                       basename_dir: Path | None = None) -> str:
    """The first existing candidate of :func:`stack_candidates`, else the first candidate.

    A missing stack is not an error here: it is reported when images are read or validated.
    """
    candidates = stack_candidates(raw, base_dirs, datadir, basename_dir=basename_dir)
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[0])


#: How a writer names the image stacks (:func:`stack_names_to_write`).
IMAGE_PATHS = ("as_read", "relative", "absolute")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def stack_names_to_write(stack_files: Sequence[str], names_read: dict[str, str] | None,
                         out: str | os.PathLike, image_paths: str,
                         read_back_dirs: Sequence[Path]) -> list[str]:
    """The name of each stack in a particle file written at ``out``.

    Parameters
    ----------
    stack_files : the stacks (paths as resolved when the table was read).
    names_read : stack file -> its name in the file the table was read from (a table's
        ``stack_names``), or None.
    out : the file being written.
    image_paths : ``"as_read"``: the name as read (so that a RELION or cryoSPARC project
        imports the output from the same project folder), where the table has it and it
        leads to the same stack from the output (looked up as the reader would:
        ``read_back_dirs``, then beside ``out``); else the path relative to the output's folder.
        ``"relative"``: the path relative to the output's folder (a folder moved with its
        stacks still reads). ``"absolute"``: absolute paths.
    read_back_dirs : where the output's reader looks relative names up
        (:func:`star_base_dirs` or :func:`cs_base_dirs` of ``out``).

    Returns
    -------
    list of str, one per stack. A relative name that would lead elsewhere from the output
    (another file of that name in the current folder) is written absolute; a stack that does
    not exist cannot be checked and is written as asked.

    Raises
    ------
    ValueError
        ``image_paths`` not one of :data:`IMAGE_PATHS`.
    """
    if image_paths not in IMAGE_PATHS:
        raise ValueError(f"image_paths must be one of {', '.join(IMAGE_PATHS)} (got {image_paths!r})")
    out_dir = Path(out).parent.absolute()
    names = []
    for stack in stack_files:
        absolute = os.path.normpath(os.path.abspath(stack))
        options = []
        if image_paths == "as_read" and names_read and stack in names_read:
            options.append(names_read[stack])
        if image_paths != "absolute":
            try:
                options.append(os.path.relpath(absolute, out_dir))
            except ValueError:  # another drive (Windows): no relative path
                pass
        if not os.path.isfile(absolute):
            names.append(options[0] if options else absolute)
            continue
        names.append(next((name for name in options if _same_file(
            resolve_stack_path(name, read_back_dirs, None, basename_dir=out_dir), absolute)), absolute))
    return names


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
