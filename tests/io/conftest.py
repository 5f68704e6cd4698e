"""Fixtures for the file-format tests: the shared real data, and small files written here."""

from __future__ import annotations

import contextlib
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoai.errors import InputError


@pytest.fixture(scope="session")
def particles_dir(shared_data: Path) -> Path:
    return shared_data / "particles"


@pytest.fixture
def expect_input_error():
    """``with expect_input_error(path, *fragments): ...`` asserts a one-line InputError that
    names ``path`` (its basename) and contains every fragment."""

    @contextlib.contextmanager
    def check(path, *fragments: str):
        with pytest.raises(InputError) as info:
            yield info
        msg = str(info.value)
        assert "\n" not in msg, msg
        assert Path(path).name in msg, msg
        for fragment in fragments:
            assert fragment in msg, msg

    return check


@pytest.fixture
def write_mrcs():
    """``write_mrcs(path, data, pixel_size=1.0)``: a stack written with plain mrcfile."""

    def write(path: Path, data: np.ndarray, pixel_size: float = 1.0) -> Path:
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.asarray(data))
            if np.asarray(data).ndim == 3:
                m.set_image_stack()
            m.voxel_size = pixel_size
        return path

    return write


STAR_31 = """
data_optics

loop_
_rlnOpticsGroup
_rlnOpticsGroupName
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
_rlnImageDimensionality
1 opticsGroup1 300.0 2.7 0.1 2.5 {box} 2

data_particles

loop_
_rlnImageName
_rlnOpticsGroup
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginXAngst
_rlnOriginYAngst
_rlnClassNumber
{rows}
"""


@pytest.fixture
def small_dataset(tmp_path: Path, write_mrcs):
    """A 4-image 16 px stack and a RELION 3.1 STAR referring to it; returns (star, stack)."""

    def make(n_images: int = 4, box: int = 16, refs=None) -> tuple[Path, Path]:
        rng = np.random.default_rng(0)
        stack = write_mrcs(tmp_path / "stack.mrcs",
                           rng.normal(size=(n_images, box, box)).astype(np.float32), 2.5)
        refs = range(1, n_images + 1) if refs is None else refs
        rows = "\n".join(
            f"{i:06d}@stack.mrcs 1 {10000 + 100 * i} {9500 + 100 * i} {10 * i} {20 * i} "
            f"{5 + 30 * i} {-15 * i} {0.5 * i} {-0.25 * i} 1"
            for i in refs
        )
        star = tmp_path / "particles.star"
        star.write_text(STAR_31.format(box=box, rows=rows))
        return star, stack

    return make
