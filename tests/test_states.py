"""Several structures in one data set: a mixture of maps with shares, the states of a motion
between two atomic models, and the classes evaluated against the true states."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import starfile

from cryoai.cli.main import main
from cryoai.evaluation.metrics import class_accuracy
from cryoai.io import read_volume, write_volume
from test_simulate import correlation, read_set, reference_images, simulate


@pytest.fixture(scope="module")
def two_maps(tmp_path_factory):
    """The embedded ribosome at 32 px, and the same turned 90 degrees about x: two structures."""
    root = tmp_path_factory.mktemp("maps")
    simulate(root / "one", "--n", "2", "--no-noise")
    volume, voxel = read_volume(root / "one" / "ground_truth.mrc")
    other = np.ascontiguousarray(np.rot90(volume, 1, axes=(0, 1)))
    write_volume(root / "a.mrc", volume, voxel)
    write_volume(root / "b.mrc", other, voxel)
    return root / "a.mrc", root / "b.mrc"


def test_a_mixture_draws_each_particle_from_its_state_with_the_shares(two_maps, tmp_path):
    a, b = two_maps
    star = simulate(tmp_path / "mix", "--map", str(a), str(b), "--shares", "3,1", "--n", "400", "--no-noise",
                    "--seed", "4")
    truth = pd.read_csv(tmp_path / "mix" / "truth.csv")
    states = truth["state"].to_numpy()
    assert set(states) == {1, 2} and abs((states == 1).mean() - 0.75) < 0.06  # 3:1, within 2.8 sd
    table, images = read_set(star)
    volumes = [read_volume(tmp_path / "mix" / f"ground_truth_state_{k:03d}.mrc")[0] for k in (1, 2)]
    np.testing.assert_array_equal(volumes[0], read_volume(a)[0])
    rows = np.arange(24)
    own = [reference_images(table.subset(rows), volumes[k]) for k in (0, 1)]
    for i in rows:  # each image is the projection of its own state's map, not of the other's
        mine, other = own[states[i] - 1][i], own[2 - states[i]][i]
        assert correlation(mine, images[i]) > 0.995 > correlation(other, images[i]) + 0.05
    # the states have their own random stream: the poses are those of a one-map simulation
    single = simulate(tmp_path / "single", "--map", str(a), "--n", "400", "--no-noise", "--seed", "4")
    np.testing.assert_array_equal(read_set(single)[0].rotations, table.rotations)


def _low_pass(volume: np.ndarray, radius_px: float) -> np.ndarray:
    n = volume.shape[0]
    k = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    f = np.fft.fftn(volume)
    f[np.sqrt(kx**2 + ky**2 + kz**2) > radius_px] = 0
    return np.fft.ifftn(f).real


def test_a_motion_between_two_models_changes_step_by_step(tmp_path, shared_data):
    models = [shared_data / "models" / f for f in ("4AKE_adk_open_MDAnalysisTests.pdb",
                                                    "1AKE_adk_closed_MDAnalysisTests.pdb")]
    if not all(m.is_file() for m in models):
        pytest.skip("the adenylate kinase models are not in ../shared/data")
    out = tmp_path / "motion"
    assert main(["simulate", "--model", *map(str, models), "--trajectory-states", "5", "--pixel-size", "3",
                 "--box", "40", "--n", "50", "--no-noise", "--quiet", "--outdir", str(out)]) == 0
    maps = [read_volume(out / f"ground_truth_state_{k:03d}.mrc")[0].astype(np.float64) for k in range(1, 6)]
    # at the scale of the domains' motion (24 A), the farther along, the less alike
    similarity = [correlation(_low_pass(maps[0], 5), _low_pass(m, 5)) for m in maps]
    assert all(x > y for x, y in itertools.pairwise(similarity)), similarity
    assert similarity[-1] < 0.85
    assert set(pd.read_csv(out / "truth.csv")["state"]) <= set(range(1, 6))


def test_class_accuracy_is_that_of_the_best_matching():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 4, 300)
    relabel = {1: 7, 2: 5, 3: 9}
    predicted = np.array([relabel[t] for t in true])
    out = class_accuracy(predicted, true)
    assert out["accuracy"] == 1.0 and out["matching"] == {7: 1, 5: 2, 9: 3}
    flipped = rng.random(300) < 0.2
    predicted[flipped] = rng.choice([5, 7, 9], flipped.sum())
    out = class_accuracy(predicted, true)
    # the independent reference: the best of every one-to-one relabelling
    best = max(np.mean(np.array([dict(zip((5, 7, 9), p, strict=True))[c] for c in predicted]) == true)
               for p in itertools.permutations((1, 2, 3)))
    assert out["accuracy"] == pytest.approx(best)
    assert np.asarray(out["confusion"]).sum() == 300


def test_evaluate_reads_the_classes_and_the_true_states(two_maps, tmp_path):
    a, b = two_maps
    star = simulate(tmp_path / "mix", "--map", str(a), str(b), "--n", "60", "--no-noise", "--seed", "2")
    truth = pd.read_csv(tmp_path / "mix" / "truth.csv")
    blocks = starfile.read(star)
    classes = np.where(truth["state"] == 1, 2, 1)  # numbered the other way round
    classes[:6] = 3 - classes[:6]  # 6 of 60 wrong
    blocks["particles"]["rlnClassNumber"] = classes
    starfile.write(blocks, tmp_path / "poses.star")
    out = tmp_path / "ev"
    assert main(["evaluate", "--map", str(a), "--poses", str(tmp_path / "poses.star"),
                 "--gt-poses", str(star), "--gt-states", str(tmp_path / "mix" / "truth.csv"),
                 "--class-maps", str(b), str(a), "--gt-state-maps", str(a), str(b),
                 "--outdir", str(out)]) == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())["classes"]
    assert metrics["accuracy"] == pytest.approx(0.9) and metrics["matching"] == {"1": 2, "2": 1}
    per_class = {row["class"]: row for row in metrics["per_class"]}
    assert per_class[1]["resolution_px_0.5"] < 2.5 and per_class[2]["resolution_px_0.5"] < 2.5  # their own


def test_classes_with_poses_per_class_separate_two_structures(tmp_path):
    """Two different structures (the ribosome, and the same without a part) at 0 dB: from start maps
    made with 30% of each class's particles swapped, each particle is posed against both maps and
    goes to the one that explains it at its own pose."""
    import torch

    from cryoai.data.dataset import ParticleDataset
    from cryoai.evaluation.metrics import align_rotations
    from cryoai.io import load_particles
    from cryoai.models.image_formation import ImageFormation
    from cryoai.pipeline.settings import assignment_settings
    from cryoai.reconstruction import ParticleSpectra, reconstruct
    from cryoai.reconstruction.classes3d import refine_classes
    from cryoai.training.config import TrainConfig

    simulate(tmp_path / "one", "--n", "2", "--no-noise")
    ribosome, voxel = read_volume(tmp_path / "one" / "ground_truth.mrc")
    gen = np.random.default_rng(1)
    # the other structure: the ribosome without the part above a tilted plane (a complex that
    # lacks a subunit), its power made the ribosome's
    z, y, x = np.indices(ribosome.shape) - 16
    partial = np.where(0.8 * x + 0.5 * y + 0.3 * z < 2.0, ribosome, 0.0)
    partial *= ribosome.std() / partial.std()
    write_volume(tmp_path / "a.mrc", ribosome, voxel)
    write_volume(tmp_path / "b.mrc", partial.astype(np.float32), voxel)
    star = simulate(tmp_path / "mix", "--map", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--n", "300",
                    "--snr-db", "0", "--seed", "6")
    table = load_particles(star)
    states = pd.read_csv(tmp_path / "mix" / "truth.csv")["state"].to_numpy() - 1
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    spectra = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
    poses = table.poses()
    start = states.copy()
    swap = gen.random(len(start)) < 0.3
    start[swap] = 1 - start[swap]
    maps = [reconstruct(spectra, poses, mask_radius_px=14.0,
                        indices=np.flatnonzero(start == k)).fourier_volume for k in (0, 1)]
    rows = np.arange(len(table))
    result, class_poses = refine_classes(spectra, rows, maps, assign=assignment_settings(TrainConfig(), 32),
                                         amplitude=np.ones(len(table)), radius_px=8.0, mask_radius_px=14.0)
    accuracy = class_accuracy(result.assignment, states)
    assert accuracy["accuracy"] >= 0.95 and accuracy["matching"] == {0: 0, 1: 1}
    for k in (0, 1):  # each class's particles posed in its own map's frame (here the truth's)
        mine = np.flatnonzero(result.assignment == k)
        errors = align_rotations(class_poses.rotations[mine].double().numpy(),
                                 poses.rotations[mine].double().numpy())["angle_deg"]
        assert np.median(errors) < 5.0, (k, np.median(errors))


def _two_parts(tmp_path, n: int, seed: int):
    """Two different structures (two parts of the embedded ribosome at 32 px, cut by a tilted
    plane, each scaled to the ribosome's power), simulated as a 3:2 mixture at 0 dB: the table,
    each particle's state (0, 1) and the two true maps."""
    from cryoai.io import load_particles

    simulate(tmp_path / "one", "--n", "2", "--no-noise")
    ribosome, voxel = read_volume(tmp_path / "one" / "ground_truth.mrc")
    z, y, x = np.indices(ribosome.shape) - 16
    below = 0.8 * x + 0.5 * y + 0.3 * z < 1.0
    parts = []
    for name, part in (("a", np.where(below, ribosome, 0.0)), ("b", np.where(below, 0.0, ribosome))):
        part = (part * ribosome.std() / part.std()).astype(np.float32)
        write_volume(tmp_path / f"{name}.mrc", part, voxel)
        parts.append(part)
    star = simulate(tmp_path / "mix", "--map", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--shares",
                    "3,2", "--n", str(n), "--snr-db", "0", "--seed", str(seed))
    states = pd.read_csv(tmp_path / "mix" / "truth.csv")["state"].to_numpy() - 1
    return load_particles(star), states, parts


def test_the_em_with_two_classes_keeps_each_image_with_its_structure(tmp_path):
    """The K-class EM step (:class:`cryoai.reconstruction.em.ExpectationMaximisation` with
    ``n_classes=2``) from the two true maps: each image's posterior picks its own structure's
    class, and each class's map stays its structure's (it correlates with its own truth more
    than with the other's)."""
    import torch

    from cryoai.data.dataset import ParticleDataset
    from cryoai.models.image_formation import ImageFormation
    from cryoai.physics.fft import fft3_c, ifft3_c
    from cryoai.reconstruction import ParticleSpectra
    from cryoai.reconstruction.em import ExpectationMaximisation

    table, states, parts = _two_parts(tmp_path, 300, 5)
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    y, c = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu")).read(np.arange(len(table)))
    em = ExpectationMaximisation(formation, n_rotations=576, max_shift_px=2.0, shift_step_px=1.0,
                                 mask_radius_px=14.0, generator=torch.Generator().manual_seed(0), n_classes=2)
    em.initialise(y, c, 6.0)
    # the true maps, at the power of the blob the images make (the data's scale)
    true = [fft3_c(torch.as_tensor(p, dtype=torch.float64)) for p in parts]
    em.class_volumes = [(t * (em.class_volumes[k].abs().square().sum() / t.abs().square().sum()).sqrt())
                        .to(torch.complex64) for k, t in enumerate(true)]
    for _ in range(3):
        out = em.iterate(y, c, 6.0, ema=0.0)
    assert out["class_posterior"].shape == (len(table), 2)
    assert torch.allclose(out["class_posterior"].sum(1), torch.ones(len(table)), atol=1e-4)
    assert (out["classes"].numpy() == states).mean() >= 0.95
    for k in (0, 1):
        made = ifft3_c(em.class_volumes[k]).real.numpy()
        assert correlation(made, parts[k]) > correlation(made, parts[1 - k]) + 0.2, k


@pytest.mark.slow
def test_the_search_finds_two_structures_together_from_blobs(tmp_path):
    """The two structures of :func:`_two_parts` (500 particles at 0 dB): the search with K = 2
    classes, from two blobs, puts each image in its structure's class and poses it in that
    class's map (heterogeneous ab initio)."""
    from dataclasses import replace

    import torch

    from cryoai.data.dataset import ParticleDataset
    from cryoai.evaluation.metrics import align_rotations
    from cryoai.models.image_formation import ImageFormation
    from cryoai.pipeline.settings import search_settings
    from cryoai.reconstruction import ParticleSpectra, search_subset
    from cryoai.training.config import TrainConfig

    table, states, _ = _two_parts(tmp_path, 500, 3)
    formation = ImageFormation(table.box_px, table.median_pixel_size_a())
    spectra = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu"))
    settings = search_settings(TrainConfig(refine_rounds=2), table.box_px)
    torch.manual_seed(0)
    found = search_subset(spectra, replace(settings, n_classes=2), log=lambda _: None)
    assert len(found.class_volumes) == 2 and found.fourier_volume is not None
    accuracy = class_accuracy(found.classes, states[found.subset])
    assert accuracy["accuracy"] >= 0.95, accuracy
    truth = table.poses().rotations[found.subset].double().numpy()
    for k in (0, 1):  # each class's images posed in its own map's frame
        mine = np.flatnonzero(found.classes == k)
        errors = align_rotations(found.rotations[mine].double().numpy(), truth[mine])["angle_deg"]
        assert np.median(errors) < 15.0, (k, np.median(errors))
