"""Small real data shipped with cryoai (see README.md in this folder for provenance)."""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def embedded_map_path() -> Path:
    """The embedded 70S ribosome map: 64^3 voxels, 5.0 A (see assets/README.md)."""
    return _HERE / "ribosome70s_64px_5A.mrc"
