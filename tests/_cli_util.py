"""Helpers for the command-line tests: run ``cryoai`` in-process and check its outcome."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cryoai.cli.main import main


def run_ok(capsys, *args: str) -> str:
    """Run ``cryoai ARGS``; assert success and return stdout."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its content (folders: '<dir>')."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_fails(capsys, root: Path, *args: str, names: tuple[str, ...] = ()) -> str:
    """Run ``cryoai ARGS``, expecting a reported error: non-zero exit, exactly one line on
    stderr that contains every string of ``names``, no traceback, and no file under ``root``
    created, changed or removed. Returns the message."""
    before = snapshot(root)
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith(f"cryoai {args[0]}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert snapshot(root) == before
    return lines[0]


def write_map(path: Path, volume: np.ndarray, voxel_size: float = 5.0) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about NaN/inf values
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.asarray(volume, dtype=np.float32))
            m.voxel_size = voxel_size
    return path


def smooth_volume(n: int) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.exp(-((x - 2) ** 2 + y**2 / 2 + (z + 1) ** 2) / (2 * (n / 8) ** 2))


def simulate_small(out: Path, n: int, seed: int) -> Path:
    """A small simulated set (L=32, SNR 0 dB) written by `cryoai simulate` into ``out``."""
    assert main(["simulate", "--box", "32", "--n", str(n), "--seed", str(seed), "--snr-db", "0",
                 "--device", "cpu", "--quiet", "--outdir", str(out)]) == 0
    return out
