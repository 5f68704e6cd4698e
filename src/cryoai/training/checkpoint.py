"""Self-describing checkpoints, written atomically and loaded without running code."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (plus the cryoai version) to ``path`` via a temporary file and rename."""
    from ..io import atomic_path

    payload = {**payload, "cryoai_version": __version__}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXX.tmp``) that a killed process left in ``folder``
    while writing an output atomically; returns them.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a file with pickled code is refused)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a cryoai checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "zip archive" in first or "central directory" in first or "EOF" in first:
            first = "truncated or corrupted file"
        elif "Weights only load failed" in first or "weights_only" in first:
            first = "it holds Python objects other than tensors, which cryoai refuses to unpickle"
        raise InputError(f"{path}: not a loadable cryoai checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise InputError(f"{path}: not a cryoai checkpoint (no model/config inside)")
    return payload


def load_pose_encoder(payload: dict | None, device):
    """The pose encoder saved in a checkpoint (``payload`` = its ``"pose_encoder"`` entry), or
    None.
    """
    from ..models.encoder import PoseGridEncoder

    if not payload:
        return None
    encoder = PoseGridEncoder(**payload["settings"])
    encoder.load_state_dict(payload["state"])
    return encoder.to(device).eval()
