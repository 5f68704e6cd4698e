"""Independent references and parametrisations shared by the physics tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cryoai

CUDA = torch.cuda.is_available()

#: Parametrisation over devices; CUDA is skipped where no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA not available")),
]

RIBOSOME_MRC = Path(cryoai.__file__).parent / "assets" / "ribosome70s_64px_5A.mrc"


def gaussian_volume(n: int, centre_xyz, sigma: float, dtype=torch.float64) -> torch.Tensor:
    """exp(-|r - p|^2 / (2 sigma^2)) sampled at voxel positions (x, y, z) = index - n//2.

    Written directly with numpy so it does not rely on cryoai's grids.
    """
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    px, py, pz = centre_xyz
    r2 = (x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2
    return torch.from_numpy(np.exp(-r2 / (2 * sigma**2))).to(dtype)


def gaussian_image(n: int, centre_xy, sigma: float, amplitude: float = 1.0) -> np.ndarray:
    """amplitude * exp(-|r - c|^2 / (2 sigma^2)) on an (n, n) [y, x] grid, centre index n//2."""
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    cx, cy = centre_xy
    return amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
