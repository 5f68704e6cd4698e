"""``cryoai symmetry-expand``: every particle at each of its equivalent poses ``S R``, read back
by starfile (angles turned into matrices by scipy) and by cryosparc-tools.
"""

from __future__ import annotations

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryoai.cli.main import main as cli
from cryoai.physics.symmetry import point_group


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    out = tmp_path_factory.mktemp("expand")
    assert cli(["simulate", "--box", "16", "--n", "5", "--snr-db", "0", "--shift-sigma-a", "3",
                "--outdir", str(out / "sim"), "--quiet", "--seed", "2"]) == 0
    return out


def _matrices(frame) -> np.ndarray:
    angles = frame[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
    return Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()  # Rz(rot) Ry(tilt) Rz(psi)


def test_every_particle_is_written_at_each_equivalent_pose(posed):
    star = posed / "sim" / "particles.star"
    out = posed / "expanded.star"
    assert cli(["symmetry-expand", str(star), "--sym", "D2", "--out", str(out)]) == 0
    before = starfile.read(star)["particles"]
    after = starfile.read(out)["particles"]
    group = point_group("D2").numpy()
    assert len(after) == len(before) * len(group)
    r_in, r_out = _matrices(before), _matrices(after)
    for i in range(len(before)):
        for k, s in enumerate(group):
            row = after.iloc[i * len(group) + k]
            np.testing.assert_allclose(r_out[i * len(group) + k], s @ r_in[i], atol=1e-4)
            assert row["rlnCryoaiSymmetryOperator"] == k + 1
            index, stack = row["rlnImageName"].split("@")  # the same image (the stack named from out/)
            assert (index, stack) == (before.iloc[i]["rlnImageName"].split("@")[0],
                                      "sim/" + before.iloc[i]["rlnImageName"].split("@")[1])
            assert row["rlnOriginXAngst"] == pytest.approx(before.iloc[i]["rlnOriginXAngst"], abs=1e-4)
            assert row["rlnDefocusU"] == pytest.approx(before.iloc[i]["rlnDefocusU"])


def test_the_expanded_cs_reads_back_in_cryosparc_tools(posed):
    dataset = pytest.importorskip("cryosparc.dataset")
    from cryoai.io.cryosparc import pose_to_matrix

    out = posed / "expanded.cs"
    star = posed / "sim" / "particles.star"
    assert cli(["symmetry-expand", str(star), "--sym", "C3", "--out", str(out)]) == 0
    ds = dataset.Dataset.load(str(out))
    before = _matrices(starfile.read(posed / "sim" / "particles.star")["particles"])
    assert len(ds) == 3 * len(before)
    rotations = pose_to_matrix(np.asarray(ds["alignments3D/pose"]))
    group = point_group("C3").numpy()
    np.testing.assert_allclose(rotations.reshape(len(before), 3, 3, 3),
                               np.einsum("kab,nbc->nkac", group, before), atol=1e-4)
