"""Fixtures for the physics tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ._refs import RIBOSOME_MRC


@pytest.fixture(scope="session")
def ribosome() -> torch.Tensor:
    """The embedded 64^3 70S map as float64, indexed [z, y, x]."""
    import mrcfile

    with mrcfile.open(RIBOSOME_MRC, permissive=True) as m:
        data = np.asarray(m.data, dtype=np.float64)
    assert data.shape == (64, 64, 64), f"unexpected map shape {data.shape}"
    return torch.from_numpy(data.copy())
