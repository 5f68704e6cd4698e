"""3D classification at fixed poses: two conformations in one set are told apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoai.models.image_formation import ImageFormation
from cryoai.physics.fft import fft3_c
from cryoai.physics.poses import Poses
from cryoai.physics.projection import sample_volume, slice_coords
from cryoai.physics.rotations import random_rotations
from cryoai.reconstruction.classes3d import Classes3DSettings, classify_3d
from cryoai.reconstruction.spectra import SpectraInMemory

N = 32


def _blobs(centres: np.ndarray) -> torch.Tensor:
    """A real map of Gaussian blobs (sd 1.5 px) at ``centres`` (k, 3) px from the box centre."""
    r = torch.arange(N, dtype=torch.float32) - N // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    vol = torch.zeros(N, N, N)
    for cz, cy, cx in centres:
        vol += torch.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.5**2))
    return vol


def test_two_conformations_are_told_apart():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-7, 7, (10, 3))
    moved = centres.copy()
    moved[:3] = rng.uniform(-7, 7, (3, 3))  # three of ten domains elsewhere: another state
    maps = [fft3_c(_blobs(c)) / N for c in (centres, moved)]
    formation = ImageFormation(N, 4.0)
    n = 600
    truth = np.repeat([0, 1], n // 2)
    gen = torch.Generator().manual_seed(1)
    rotations = random_rotations(n, generator=gen)
    coords = slice_coords(rotations, formation.coords_px)
    signal = torch.stack([sample_volume(maps[int(k)], coords[i:i + 1])[0] for i, k in enumerate(truth)])
    band = formation.radius_px <= 8
    # Whitened units: unit noise per coefficient, a signal energy of about 150 per image in the band.
    signal *= (150 / float((signal[:, band].abs() ** 2).sum(-1).mean())) ** 0.5
    noise = torch.complex(torch.randn(signal.shape, generator=gen), torch.randn(signal.shape, generator=gen))
    spectra = signal + noise / np.sqrt(2)
    particles = SpectraInMemory(spectra, torch.ones(spectra.shape), formation)
    poses = Poses(rotations, torch.zeros(n, 2))
    found = classify_3d(particles, poses, np.arange(n), amplitude=np.ones(n), radius_px=8.0,
                        mask_radius_px=13.0, settings=Classes3DSettings(n_classes=2, seed=3))
    agreement = max(np.mean(found.assignment == truth), np.mean(found.assignment != truth))
    assert agreement > 0.9, agreement
    assert sorted(found.sizes.tolist()) == sorted(np.bincount(found.assignment).tolist())
    assert len(found.reconstructions) == 2 and np.all(found.resolution_px < 6)
    assert np.median(found.probability) > 0.9
    with pytest.raises(ValueError, match="at least"):
        classify_3d(particles, poses, np.arange(30), amplitude=np.ones(n), radius_px=8.0,
                    mask_radius_px=13.0, settings=Classes3DSettings(n_classes=2))


def test_empty_images_gather_in_a_junk_class():
    """Particles of one map and empty images (noise alone): with the micrograph's amplitude in
    the likelihood, the empty images fall into the class whose map is weakest."""
    rng = np.random.default_rng(4)
    volume = fft3_c(_blobs(rng.uniform(-7, 7, (10, 3)))) / N
    formation = ImageFormation(N, 4.0)
    n_real, n_empty = 400, 200
    gen = torch.Generator().manual_seed(2)
    rotations = random_rotations(n_real + n_empty, generator=gen)
    signal = sample_volume(volume, slice_coords(rotations, formation.coords_px))
    band = formation.radius_px <= 8
    signal *= (150 / float((signal[:, band].abs() ** 2).sum(-1).mean())) ** 0.5
    signal[n_real:] = 0
    noise = torch.complex(torch.randn(signal.shape, generator=gen), torch.randn(signal.shape, generator=gen))
    particles = SpectraInMemory(signal + noise / np.sqrt(2), torch.ones(signal.shape), formation)
    found = classify_3d(particles, Poses(rotations, torch.zeros(n_real + n_empty, 2)),
                        np.arange(n_real + n_empty), amplitude=np.ones(n_real + n_empty), radius_px=8.0,
                        mask_radius_px=13.0, settings=Classes3DSettings(n_classes=2, seed=1))
    junk_class = np.bincount(found.assignment[n_real:], minlength=2).argmax()
    assert np.mean(found.assignment[n_real:] == junk_class) > 0.9
    assert np.mean(found.assignment[:n_real] == junk_class) < 0.1
    # The junk class's map is the weaker one: its resolution is worse.
    assert found.resolution_px[junk_class] > found.resolution_px[1 - junk_class]


def test_train_with_classes_writes_the_classes(tmp_path):
    """``cryoai train --classes 2``: each particle's class and probability in poses.star, the
    junk call in its own column, one map per class, their sizes in outputs.json and the report."""
    import json

    import starfile

    from cryoai.cli.main import main as cli
    from cryoai.io import read_volume

    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", str(N), "--n", "400", "--snr-db", "-5", "--seed", "2",
                "--junk-fraction", "0.25", "--outdir", str(sim), "--quiet", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet", "--no-tensorboard",
                "--device", "cpu", "--pose-encoder", "off", "--search-iterations", "15",
                "--refine-rounds", "2", "--decoder-epochs", "0.2", "--search-retries", "0",
                "--classes", "2", "--no-class-search"]) == 0
    table = starfile.read(run / "poses.star", always_dict=True)["particles"]
    assert set(table["rlnClassNumber"].unique()) == {1, 2}
    assert table["rlnCryoaiClassProbability"].between(0, 1).all()
    assert set(table["rlnCryoaiJunk"].unique()) <= {0, 1}
    outputs = json.loads((run / "outputs.json").read_text())
    sizes = [c["particles"] for c in outputs["classes"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 400
    assert sizes == [int((table["rlnClassNumber"] == k).sum()) for k in (1, 2)]
    assert sum(c["junk_called"] for c in outputs["classes"]) == outputs["junk"]
    for c in outputs["classes"]:
        volume, _ = read_volume(run / c["map"])
        assert volume.shape == (N, N, N) and np.isfinite(volume).all() and c["resolution_a"] > 0
    assert cli(["report", str(run)]) == 0
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["class_1_particles"] == sizes[0] and report["junk_particles"] == outputs["junk"]
    # the classes searched together (the default with --classes): no junk called against one map
    searched = tmp_path / "searched"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(searched), "--quiet",
                "--no-tensorboard",
                "--device", "cpu", "--pose-encoder", "off", "--search-iterations", "15",
                "--refine-rounds", "2", "--decoder-epochs", "0.2", "--search-retries", "0",
                "--classes", "2"]) == 0
    table = starfile.read(searched / "poses.star", always_dict=True)["particles"]
    assert set(table["rlnClassNumber"].unique()) == {1, 2} and "rlnCryoaiJunk" not in table
    outputs = json.loads((searched / "outputs.json").read_text())
    assert sum(c["particles"] for c in outputs["classes"]) == 400
    assert "junk: not called against one map" in (searched / "run.log").read_text()
    assert cli(["report", str(searched)]) == 0
    # --classes needs the searched poses
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(tmp_path / "given"), "--quiet",
                "--poses", str(sim / "particles.star"), "--classes", "2", "--device", "cpu"]) != 0
