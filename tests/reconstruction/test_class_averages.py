"""2D class averages: the averages as particles (an identity), views sorted into classes, and the
search started from them."""

from __future__ import annotations

import json

import numpy as np
import torch

from cryoai.cli.main import main as cli
from cryoai.data.dataset import ParticleDataset
from cryoai.io import load_particles
from cryoai.models.image_formation import ImageFormation
from cryoai.reconstruction import ParticleSpectra
from cryoai.reconstruction.class_averages import ClassAverageSettings, class_averages, class_particles


def _spectra(star):
    table = load_particles(star)
    formation = ImageFormation(table.box_px, float(table.pixel_size_a[0]))
    y, c = ParticleSpectra(ParticleDataset(table), formation, torch.device("cpu")).read(np.arange(len(table)))
    return table, formation, y, c


def test_a_class_average_stands_for_its_images(tmp_path):
    """``class_particles``: ``||y - c P||^2`` differs from its images' summed ``||Y_i - C_i P||^2``
    by the same constant for any projection P (the module docstring's identity)."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "24", "--n", "12", "--snr-db", "0", "--outdir", str(sim),
                "--quiet"]) == 0
    _, formation, y, c = _spectra(sim / "particles.star")
    settings = ClassAverageSettings(mask_radius_px=100.0, n_classes=1, n_angles=1, iterations=0,
                                    radius_px=8.0, min_images=1)
    one = (torch.zeros(len(y), dtype=torch.long), torch.zeros(len(y), dtype=torch.long))
    averages = class_averages(formation, y, c, settings, first=one, log=lambda _m: None)
    yk, ck = class_particles(formation, averages, min_images=1)
    band = formation.band(8.0)
    w = formation.hermitian_weight[band]
    gen = torch.Generator().manual_seed(1)
    gaps = []
    for _ in range(3):
        p = torch.randn(int(band.sum()), dtype=torch.complex64, generator=gen)
        images = ((y[:, band] - c[:, band] * p).abs().square() * w).sum()
        average = ((yk[0, band] - ck[0, band] * p).abs().square() * w).sum()
        gaps.append(float(images - average))
    assert np.ptp(gaps) < 1e-4 * abs(gaps[0]), gaps


def _view_spread_deg(labels: np.ndarray, rotations: np.ndarray) -> float:
    """Median over classes of the median angle between a class's view directions and their mean."""
    view = rotations[:, :, 2]
    spreads = []
    for k in np.unique(labels):
        v = view[labels == k]
        if len(v) >= 5:
            mean = v.mean(0) / np.linalg.norm(v.mean(0))
            spreads.append(np.degrees(np.median(np.arccos(np.clip(v @ mean, -1, 1)))))
    return float(np.median(spreads))


def test_classes_gather_images_of_one_view(tmp_path):
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "600", "--snr-db", "0", "--seed", "2",
                "--outdir", str(sim), "--quiet"]) == 0
    table, formation, y, c = _spectra(sim / "particles.star")
    settings = ClassAverageSettings(mask_radius_px=14.0, n_classes=12, iterations=15, radius_px=8.0,
                                    max_shift_px=3.0, shift_step_px=1.5)
    averages = class_averages(formation, y, c, settings, log=lambda _m: None)
    assert averages.images.shape == (12, 32, 32) and int(averages.sizes.sum()) == 600
    spread = _view_spread_deg(averages.assignment.numpy(), table.rotations)
    rng = np.random.default_rng(0)
    shuffled = _view_spread_deg(rng.integers(0, 12, 600), table.rotations)
    # 12 classes of a sphere of views are caps of about 33 deg radius: a median of about 23 deg
    # from a class's mean view at best. Measured 37 deg; random classes 83 deg.
    assert spread < 45 < shuffled, (spread, shuffled)


def test_search_from_class_averages_finds_poses(tmp_path):
    """``--search-start classes``: the search starts from a map posed from 2D class averages."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "32", "--n", "900", "--snr-db", "-5", "--seed", "4",
                "--outdir", str(sim), "--quiet"]) == 0
    run = tmp_path / "run"
    assert cli(["train", str(sim / "particles.star"), "--outdir", str(run), "--quiet", "--no-tensorboard",
                "--search-start", "classes", "--search-iterations", "30", "--search-batch", "300",
                "--search-retries", "0", "--pose-encoder", "off", "--decoder-epochs", "0.2"]) == 0
    assert (run / "class_averages.mrcs").exists()
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "search_start" and r["start"] == "classes" for r in records)
    plan = next(r for r in records if r.get("stage") == "search_plan")  # every particle; the final band
    assert (plan["particles"], plan["subset"], plan["batch"]) == (900, 900, 300)
    assert plan["start"] == "2D class averages" and plan["band_start_px"] == plan["band_end_px"] == 10.0
    ev = tmp_path / "eval"
    assert cli(["evaluate", "--map", str(run / "volume.mrc"), "--poses", str(run / "poses.star"),
                "--gt-poses", str(sim / "particles.star"), "--outdir", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["rotation_error_deg_median"] < 10.0, metrics["rotation_error_deg_median"]
    assert cli(["report", str(run)]) == 0  # the report shows the class averages
    page = (run / "report" / "report.html").read_text()
    said = json.loads((run / "report" / "report.json").read_text())  # the search's plan, in the report
    assert said["search_start"] == "2D class averages" and said["search_particles"] == 900
    assert said["search_kept"] == "attempt 1 of 1 (classes)", said
    assert "2D class averages" in page and (run / "report" / "class_averages.png").exists()


def test_annealing_spreads_the_first_images_over_the_classes(tmp_path):
    """``first_noise_factor``: the first iteration's posterior is taken at that many times the
    noise. At a huge factor every image is spread evenly over every class, angle and shift, so the
    classes' sums come out alike; at 1 (no annealing) they part from the first iteration."""
    sim = tmp_path / "sim"
    assert cli(["simulate", "--box", "24", "--n", "120", "--snr-db", "0", "--seed", "3", "--outdir", str(sim),
                "--quiet"]) == 0
    _, formation, y, c = _spectra(sim / "particles.star")

    def spread_of_sums(factor: float) -> float:
        settings = ClassAverageSettings(mask_radius_px=10.0, n_classes=4, n_angles=12, iterations=1,
                                        radius_px=6.0, max_shift_px=0.0, first_noise_factor=factor,
                                        anneal_fraction=1.0)
        num = class_averages(formation, y, c, settings, log=lambda _m: None).numerator
        return float((num - num.mean(0)).abs().square().sum() / num.abs().square().sum())

    even, plain = spread_of_sums(1e6), spread_of_sums(1.0)
    assert even < 1e-6 and plain > 0.1, (even, plain)  # measured 2e-12 and 0.44
