"""The simulator's realism layer: each switch does what it says, measured on what is written.

Sets are simulated in-process from the embedded 70S map Fourier-cropped to 32 or 64 px and
read back from the files (mrcfile for raw values, cryoai.io for the STAR), so every check also
covers what a user of the files sees. Because every random value of a particle is tied to its
index and drawn whatever the switches, a set with a nuisance switched on can be compared image
by image with the same set without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from _cli_util import run_fails
from cryoai.cli.main import main
from cryoai.io import load_particles
from cryoai.simulate.views import rotations_with_directions, sample_views, sampling_compensation_factor


def simulate(outdir: Path, *extra: str, box: int = 32) -> tuple[Path, dict]:
    """Run ``cryoai simulate --box BOX`` (embedded map, CPU) into ``outdir``; the STAR and report."""
    rc = main(["simulate", "--box", str(box), "--device", "cpu", "--quiet", "--outdir", str(outdir),
               *[str(e) for e in extra]])
    assert rc == 0
    return outdir / "particles.star", json.loads((outdir / "simulation.json").read_text())


def images_of(outdir: Path) -> np.ndarray:
    """Every image of the set's stacks (float64), read with mrcfile."""
    out = []
    for path in sorted(outdir.glob("particles_*.mrcs")):
        with mrcfile.open(path, permissive=False) as mrc:
            out.append(np.asarray(mrc.data, dtype=np.float64))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Views and the SCF


def test_rotations_with_directions_are_rotations_viewing_along_the_direction():
    gen = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(50, 3, generator=gen, dtype=torch.float64), dim=-1)
    d[0] = torch.tensor([1.0, 0.0, 0.0])  # the helper axis switch
    psi = torch.rand(50, generator=gen, dtype=torch.float64) * 6
    r = rotations_with_directions(d, psi)
    torch.testing.assert_close(r[:, :, 2], d)
    torch.testing.assert_close(r.transpose(1, 2) @ r, torch.eye(3, dtype=torch.float64).expand(50, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(50, dtype=torch.float64))


def test_view_distributions_have_their_statistics():
    gen = torch.Generator().manual_seed(1)
    n = 20000
    cone = sample_views(n, "top_cone", gen, cone_half_angle_deg=20.0, uniform_fraction=0.2)
    cos_to_axis = cone[:, 2, 2].numpy()  # viewing direction . z
    inside = (cos_to_axis >= math.cos(math.radians(20.0)) - 1e-9).mean()
    expected = 0.8 + 0.2 * (1 - math.cos(math.radians(20.0))) / 2
    assert abs(inside - expected) < 0.01
    cluster = sample_views(n, "cluster", gen, fraction=1.0, kappa=10.0)
    # von Mises-Fisher on S^2: E[cos] = coth(kappa) - 1/kappa
    assert abs(cluster[:, 2, 2].mean().item() - (1 / math.tanh(10.0) - 0.1)) < 0.005
    side = sample_views(n, "side", gen)
    assert side[:, 2, 2].abs().max().item() < 1e-9


def test_scf_uniform_side_and_top_views():
    """SCF (Baldwin & Lyumkis): 1 for uniform views, 8 / pi^2 for pure side views (derived from
    the sampling density 2 / (pi sin(theta)) of side views relative to uniform ones), near 0 for
    a cone of top views, and between for a partly preferred view."""
    gen = torch.Generator().manual_seed(2)
    n = 20000
    assert sampling_compensation_factor(sample_views(n, "uniform", gen).numpy()) > 0.97
    side = sampling_compensation_factor(sample_views(n, "side", gen).numpy())
    assert abs(side - 8 / math.pi**2) < 0.03, side
    top = sampling_compensation_factor(sample_views(n, "top_cone", gen, cone_half_angle_deg=20.0,
                                                    uniform_fraction=0.0).numpy())
    assert top < 0.2
    partial = sampling_compensation_factor(sample_views(n, "top_cone", gen, cone_half_angle_deg=20.0,
                                                        uniform_fraction=0.2).numpy())
    assert top < partial < 0.81


# ---------------------------------------------------------------------------------------------
# Micrographs


def test_micrographs_share_their_ctf(tmp_path):
    star, report = simulate(tmp_path / "m", "--n", 400, "--no-noise", "--micrographs",
                            "--particles-per-micrograph", 40)
    table = load_particles(star)
    truth = pd.read_csv(tmp_path / "m" / "truth.csv")
    mic_names = starfile.read(star)["particles"]["rlnMicrographName"].to_numpy()  # an independent reader
    assert report["micrographs"] == truth["micrograph"].nunique() == len(set(mic_names))
    assert 5 <= report["micrographs"] <= 20  # 400 / Poisson(40)
    mean = (table.defocus_u_a + table.defocus_v_a) / 2
    astig = table.defocus_u_a - table.defocus_v_a
    for m in np.unique(truth["micrograph"]):
        rows_m = np.flatnonzero(truth["micrograph"].to_numpy() == m)
        assert len(set(mic_names[rows_m])) == 1
        np.testing.assert_allclose(astig[rows_m], astig[rows_m[0]], rtol=1e-4, atol=0.05)
        angle = table.defocus_angle_rad
        np.testing.assert_allclose(angle[rows_m], angle[rows_m[0]], atol=1e-6)
        assert np.ptp(mean[rows_m]) < 6 * 150  # only the per-particle jitter (sd 150 A)
        assert np.ptp(truth["bfactor_a2"].to_numpy()[rows_m]) == 0
        assert np.ptp(truth["noise_scale"].to_numpy()[rows_m]) == 0
    assert mean.min() >= 8100 - 1000 and mean.max() <= 38700 + 1000
    # Between micrographs, the defocus varies as the 10028 fit (sd of ln about 0.22).
    per_mic = pd.Series(np.log(mean)).groupby(truth["micrograph"]).mean()
    assert 0.08 < per_mic.std() < 0.45


# ---------------------------------------------------------------------------------------------
# Junk


def test_junk_fraction_kinds_and_what_each_kind_is(tmp_path):
    n = 600
    mix = "empty=1,partial=1,neighbour=1,blob=1,off_centre=1"
    _, report = simulate(tmp_path / "junk", "--n", n, "--no-noise", "--junk-fraction", 0.4, "--junk-mix", mix,
                         "--seed", 3, box=64)
    _, clean_report = simulate(tmp_path / "clean", "--n", n, "--no-noise", "--junk-fraction", 0.0,
                               "--seed", 3, box=64)
    truth = pd.read_csv(tmp_path / "junk" / "truth.csv")
    kind = truth["kind"].to_numpy()
    junk = kind != "particle"
    assert abs(junk.mean() - 0.4) < 0.06
    assert report["real_particles"] == int((~junk).sum()) and clean_report["real_particles"] == n
    for k in ("empty", "partial", "neighbour", "blob", "off_centre"):
        assert 0.05 < (kind == k).mean() < 0.12, k
        assert report["junk"][k] == int((kind == k).sum())
    with_junk, without = images_of(tmp_path / "junk"), images_of(tmp_path / "clean")
    real = kind == "particle"
    np.testing.assert_array_equal(with_junk[real], without[real])  # the same particles otherwise
    energy = (with_junk**2).sum(axis=(1, 2)) / (without**2).sum(axis=(1, 2))
    corr = (with_junk * without).sum(axis=(1, 2)) / np.sqrt(
        (with_junk**2).sum(axis=(1, 2)) * (without**2).sum(axis=(1, 2)) + 1e-30)
    assert np.abs(with_junk[kind == "empty"]).max() == 0
    assert np.all((energy[kind == "partial"] > 0.1) & (energy[kind == "partial"] < 0.95))
    assert np.median(corr[kind == "partial"]) > 0.5  # still mostly the particle
    assert np.median(energy[kind == "neighbour"]) > 1.3  # a second particle
    assert np.median(corr[kind == "blob"]) < 0.5  # not the particle
    # Off-centre picks: the image's centre of mass (of |image| after a low-pass) far from the
    # box centre, while the real particles' stays near it.
    def off_centre_px(images):
        spec = np.fft.fft2(images)
        k = np.fft.fftfreq(64)
        spec *= np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) / 0.03**2)
        smooth = np.abs(np.fft.ifft2(spec).real)
        c = np.arange(64) - 32
        w = smooth / smooth.sum(axis=(1, 2), keepdims=True)
        return np.hypot((w.sum(1) * c).sum(-1), (w.sum(2) * c).sum(-1))
    assert np.median(off_centre_px(with_junk[kind == "off_centre"])) > 8
    assert np.median(off_centre_px(with_junk[real])) < 4


def test_partial_cut_removes_the_requested_share_on_one_side():
    from cryoai.simulate.realism import cut_partial

    gen = torch.Generator().manual_seed(4)
    c = torch.arange(48, dtype=torch.float64) - 24
    blob = torch.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * 8.0**2))
    texture = 1 + 0.3 * torch.rand(6, 48, 48, generator=gen, dtype=torch.float64)
    images = blob[None].repeat(6, 1, 1) * texture
    angle = torch.rand(6, generator=gen, dtype=torch.float64) * 6.28
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    fraction = torch.tensor([0.3, 0.35, 0.4, 0.45, 0.3, 0.4], dtype=torch.float64)
    cut = cut_partial(images, direction, fraction)
    removed = 1 - cut.sum(dim=(1, 2)) / images.sum(dim=(1, 2))
    torch.testing.assert_close(removed, fraction, atol=0.03, rtol=0)
    # What is removed lies on the low side of the direction: the kept centroid moves along it.
    xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1)  # (..., (x, y))
    centroid = (cut[..., None] * xy).sum(dim=(1, 2)) / cut.sum(dim=(1, 2))[:, None]
    assert bool(((centroid * direction).sum(-1) > 2.0).all())


# ---------------------------------------------------------------------------------------------
# Output: RELION-like stacks, float16, cropping


def test_background_normalised_like_relion(tmp_path):
    flags = ("--n", 64, "--snr-db", -5, "--structural-snr", 1.4, "--noise-colour", 0.5)
    simulate(tmp_path / "n", *flags, "--normalise")
    simulate(tmp_path / "raw", *flags, "--no-normalise")
    images, raw = images_of(tmp_path / "n"), images_of(tmp_path / "raw")
    c = np.arange(32) - 16
    outside = np.hypot(c[:, None], c[None, :]) > 0.75 * 16
    bg = images[:, outside]
    np.testing.assert_allclose(bg.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(axis=1, ddof=1), 1, atol=1e-4)
    # Each image is the raw one under a positive affine map: the contrast (protein white) is kept.
    for a, b in zip(images, raw, strict=True):
        slope, intercept = np.polyfit(b.ravel(), a.ravel(), 1)
        assert slope > 0
        np.testing.assert_allclose(a, slope * b + intercept, atol=1e-4)


def test_float16_stack_reads_back_as_the_float32_one_rounded(tmp_path):
    simulate(tmp_path / "f32", "--n", 40, "--normalise", "--micrographs")
    star16, _ = simulate(tmp_path / "f16", "--n", 40, "--normalise", "--micrographs", "--float16")
    with mrcfile.open(next((tmp_path / "f16").glob("*.mrcs"))) as mrc:
        assert int(mrc.header.mode) == 12
    a, b = images_of(tmp_path / "f32"), images_of(tmp_path / "f16")
    np.testing.assert_array_equal(a.astype(np.float16).astype(np.float64), b)
    # cryoai's reader gives the same values.
    from cryoai.io import ImageSource

    table = load_particles(star16)
    np.testing.assert_array_equal(ImageSource(table).read(np.arange(40)).astype(np.float64), b)


def test_output_box_renders_fine_and_crops(tmp_path):
    star, report = simulate(tmp_path / "c", "--n", 16, "--no-noise", "--output-box", 32, box=64)
    table = load_particles(star)
    assert table.box_px == 32 and report["box_px"] == 32
    from cryoai.io import read_volume

    vol, voxel = read_volume(tmp_path / "c" / "ground_truth.mrc")
    assert vol.shape == (32, 32, 32)
    assert abs(float(table.pixel_size_a[0]) - 10.0) < 1e-4 and abs(voxel - 10.0) < 1e-4  # 64 px at 5 A
    # The same particles rendered at 32 px directly agree at low frequency with the cropped ones
    # (up to one scale: a projection sums the voxels along z, twice as many at 64 px).
    simulate(tmp_path / "d", "--n", 16, "--no-noise", "--output-box", 32, box=32)
    a, b = images_of(tmp_path / "c"), images_of(tmp_path / "d")
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    k = np.fft.fftfreq(32)
    low = np.hypot(k[:, None], k[None, :]) < 0.15
    scale = (np.conj(fb[:, low]) * fa[:, low]).real.sum() / (np.abs(fb[:, low]) ** 2).sum()
    assert abs(scale - 2.0) < 0.1, scale
    err = np.abs(fa[:, low] - scale * fb[:, low]).sum() / np.abs(scale * fb[:, low]).sum()
    assert err < 0.05, err


# ---------------------------------------------------------------------------------------------
# SNR, three ways


@pytest.mark.parametrize("definition", ["box", "masked", "integrated"])
def test_snr_measured_three_ways_within_half_a_db(tmp_path, definition):
    """The noise is read back as the difference of the noisy and the noise-free sets (same
    seed): each definition's ratio, computed here from the files, is within 0.5 dB of the
    request, with micrographs (noise and intensity scales), coloured and structural noise."""
    request = {"box": -12.0, "masked": -6.0, "integrated": 20.0}[definition]
    common = ("--n", 600, "--micrographs", "--particles-per-micrograph", 5, "--noise-colour", 0.4,
              "--structural-snr", 2.0, "--seed", 5, "--snr-definition", definition)
    _, report = simulate(tmp_path / "noisy", *common, "--snr-db", request)
    noisy = images_of(tmp_path / "noisy")
    # The particles' signal alone: rendered again without the shot noise, without structure.
    simulate(tmp_path / "signal", *common, "--no-noise", "--structural-snr", 1e12)
    simulate(tmp_path / "signal_structure", *common, "--no-noise")
    signal = images_of(tmp_path / "signal")
    noise = noisy - images_of(tmp_path / "signal_structure")
    c = np.arange(32) - 16
    disk = np.hypot(c[:, None], c[None, :]) <= report["particle_radius_px"]
    noise_var = noise.var(axis=(1, 2)).sum()
    measured = {"box": signal.var(axis=(1, 2)).sum() / noise_var,
                "masked": (signal[:, disk] ** 2).mean(axis=1).sum() / noise_var,
                "integrated": (signal**2).sum(axis=(1, 2)).sum() / noise_var}
    db = {k: 10 * math.log10(v) for k, v in measured.items()}
    assert abs(db[definition] - request) < 0.5, db
    assert abs(report["snr_db_box"] - db["box"]) < 0.05
    assert abs(report["snr_db_masked"] - db["masked"]) < 0.05
    assert abs(report["isnr_db"] - db["integrated"]) < 0.05


# ---------------------------------------------------------------------------------------------
# Recipes, determinism, bad input


def test_recipe_runs_reports_and_is_deterministic(tmp_path):
    _, report = simulate(tmp_path / "a", "--recipe", "hostile", "--n", 300)
    _, again = simulate(tmp_path / "b", "--recipe", "hostile", "--n", 300)
    np.testing.assert_array_equal(images_of(tmp_path / "a"), images_of(tmp_path / "b"))
    assert report["recipe"] == "hostile" and report["config"]["realism"]["views"] == "top_cone"
    assert 0.4 < sum(report["junk"].values()) / 300 < 0.6
    assert report["views_scf"] < 0.81
    assert abs(report["snr_db_measured"] - (-9.0)) < 1.0
    table = load_particles(tmp_path / "a" / "particles.star")
    assert len(table) == 300
    # A flag given with the recipe overrides it.
    _, uniform = simulate(tmp_path / "c", "--recipe", "hostile", "--n", 300, "--views", "uniform",
                          "--junk-fraction", 0)
    assert uniform["views_scf"] > 0.9 and sum(uniform["junk"].values()) == 0


def test_ideal_set_unchanged_without_realism_flags(tmp_path):
    """No recipe and no realism flag: the simulator's ideal path, byte for byte (no truth.csv)."""
    simulate(tmp_path / "a", "--n", 20, "--snr-db", -10, "--shift-sigma-a", 0)
    simulate(tmp_path / "b", "--n", 20)
    np.testing.assert_array_equal(images_of(tmp_path / "a"), images_of(tmp_path / "b"))
    assert not (tmp_path / "a" / "truth.csv").exists()


@pytest.mark.parametrize("flags, names", [
    (("--junk-mix", "dust=1"), ("--junk-mix", "dust")),
    (("--junk-fraction", "1.5"), ("junk_fraction",)),
    (("--output-box", "64"), ("--output-box", "64")),
])
def test_bad_realism_flags_are_refused(tmp_path, capsys, flags, names):
    run_fails(capsys, tmp_path, "simulate", "--box", "32", "--n", "10", "--quiet", "--outdir",
              str(tmp_path / "out"), *flags, names=names)


def test_preferred_views_warn_and_a_search_says_its_rare_views_may_be_wrong(tmp_path, capsys):
    import torch

    from cryoai.pipeline.records import Particles
    from cryoai.pipeline.stages import views_stage
    from cryoai.training.config import TrainConfig

    star, report = simulate(tmp_path / "top", "--views", "top_cone", "--cone-half-angle-deg", 20,
                            "--cone-uniform-fraction", 0.1, "--n", 200, "--no-noise")
    assert report["views_scf"] < 0.81
    table = load_particles(star)
    particles = Particles(table, None, None, torch.device("cpu"))
    warnings = {}
    for mode in ("search", "given"):
        record = views_stage(particles, TrainConfig(), table.poses(), None, searched=mode == "search",
                             balanced=False)
        assert record.figures["views_scf"] < 0.81
        warnings[mode] = " ".join(record.warnings)
    assert "views are preferred" in warnings["search"] and "views are preferred" in warnings["given"]
    assert "pose the rare views wrong" in warnings["search"]
    assert "pose the rare views wrong" not in warnings["given"]  # no search: the poses were given
    uniform_star, _ = simulate(tmp_path / "uniform", "--n", 200, "--no-noise")
    uniform = load_particles(uniform_star)
    record = views_stage(Particles(uniform, None, None, torch.device("cpu")), TrainConfig(), uniform.poses(),
                         None, searched=True, balanced=False)
    assert record.figures["views_scf"] > 0.81 and not record.warnings
