"""Helpers shared by commands: device choice, output directories, progress bars."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, OutputError


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def prepare_outdir(outdir: str | Path, *, marker: str, force: bool = False, resume: bool = False,
                   resumable: bool = True) -> Path:
    """Create ``outdir``; refuse to reuse one that holds ``marker`` (a previous run's file)
    unless ``force`` or ``resume``. ``resumable``: whether the command has ``--resume`` (named
    in the message).
    """
    path = Path(outdir)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    if (path / marker).exists() and not (force or resume):
        hint = " or --resume to continue it" if resumable else ""
        raise OutputError(f"{path}: holds a previous run ({marker}); use --force to "
                          f"overwrite{hint}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def progress_bar(total: int, desc: str, unit: str = "img", disable: bool = False):
    """A tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
