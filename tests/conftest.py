"""Fixtures shared by the top-level tests (simulator, command line, agreement with ASPIRE).

``tests/io`` and ``tests/physics`` have their own conftest files; a fixture defined there takes
precedence inside that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """``$CRYOAI_SHARED_DATA``, or ``<repo>/../shared/data``."""
    env = os.environ.get("CRYOAI_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder; the test is skipped (with the path tried) when it is absent."""
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set CRYOAI_SHARED_DATA to its folder)")
    return d


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small tensors: one thread is as fast, and far faster when other jobs hold the cores
    (OpenMP threads spin-waiting on a busy core slow small ops down a hundredfold)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
