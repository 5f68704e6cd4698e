"""Self-describing checkpoints, written atomically and loaded without running code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (plus the cryoai version) to ``path`` via a temporary file and rename."""
    path = Path(path)
    payload = {**payload, "cryoai_version": __version__}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a file with pickled code is refused)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a cryoai checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a loadable cryoai checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise InputError(f"{path}: not a cryoai checkpoint (no model/config inside)")
    return payload
