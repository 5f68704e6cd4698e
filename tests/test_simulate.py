"""The simulator (``cryoai simulate``) against independent references.

Data sets are simulated in-process from the embedded 70S map Fourier-cropped to 32 px
(10 A/px) and read back through ``cryoai.io``, so every check also covers what the STAR file
records. The image-formation reference is written here in numpy from CONVENTIONS.md; the
projection comes from the real-space line-integral projector, not the Fourier slicer the
simulator uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from cryoai.cli.main import main
from cryoai.io import ImageSource, load_particles, open_stack, read_volume
from cryoai.physics.projection import project_real_space

BOX = 32


def simulate(outdir: Path, *extra: str) -> Path:
    """Run ``cryoai simulate --box 32`` (embedded map, CPU) into ``outdir``; returns the STAR."""
    rc = main(["simulate", "--box", str(BOX), "--device", "cpu", "--quiet",
               "--outdir", str(outdir), *extra])
    assert rc == 0
    return outdir / "particles.star"


def read_set(star: Path):
    """(ParticleTable, all images as float64 (n, N, N))."""
    table = load_particles(star)
    images = ImageSource(table).read(np.arange(len(table))).astype(np.float64)
    return table, images


def stacks(outdir: Path) -> list[Path]:
    return sorted(outdir.glob("particles_*.mrcs"))


def mrc_content(path: Path) -> bytes:
    """An MRC file's bytes without its text labels (header bytes 220-1023), where mrcfile
    stamps the creation time: every header field and value must be reproducible."""
    raw = path.read_bytes()
    assert raw[1024:] and int.from_bytes(raw[92:96], "little") == 0  # no extended header
    return raw[:220] + raw[1024:]


# -- numpy reference of image formation (CONVENTIONS.md) ---------------------------------------

def fft_c(x: np.ndarray, axes) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes), axes=axes)


def ifft_c(x: np.ndarray, axes) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, axes=axes), axes=axes), axes=axes)


def fourier_upsample_3d(volume: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited interpolation of a volume onto a grid ``factor`` times finer (same centre)."""
    n = volume.shape[-1]
    m = n * factor
    spec = fft_c(volume, (0, 1, 2))
    spec[0, :, :] = spec[:, 0, :] = spec[:, :, 0] = 0  # unpaired Nyquist planes
    big = np.zeros((m, m, m), dtype=complex)
    s = slice(m // 2 - n // 2, m // 2 + n // 2)
    big[s, s, s] = spec
    return ifft_c(big, (0, 1, 2)).real


def ctf_numpy(n: int, pixel_size_a: float, du, dv, angle_rad, voltage_kv, cs_mm, w,
              phase_shift_rad, bfactor_a2) -> np.ndarray:
    """The RELION CTF on a centred (n, n) grid, straight from CONVENTIONS.md."""
    k = (np.arange(n) - n // 2) / (n * pixel_size_a)
    kx, ky = np.meshgrid(k, k, indexing="xy")  # [y, x]
    s2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx)
    volts = voltage_kv * 1e3
    lam = 12.2639 / np.sqrt(volts + 0.97845e-6 * volts**2)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (theta - angle_rad))
    cs_a = cs_mm * 1e7
    chi = np.pi * lam * defocus * s2 - 0.5 * np.pi * cs_a * lam**3 * s2**2 + phase_shift_rad
    return -(np.sqrt(1 - w * w) * np.sin(chi) + w * np.cos(chi)) * np.exp(-bfactor_a2 * s2 / 4)


def reference_images(table, volume: np.ndarray) -> np.ndarray:
    """Images of ``volume`` at the table's poses, CTFs and shifts, by an independent path.

    Real-space trilinear line integrals lose high frequencies on a 32 px map (per-image
    correlation down to 0.975 measured), so the map is first interpolated exactly onto a grid
    twice as fine, projected there, and the projections Fourier-cropped back (0.997 measured).
    """
    n = table.box_px
    pixel = float(table.pixel_size_a[0])
    fine = torch.from_numpy(fourier_upsample_3d(volume.astype(np.float64), 2))
    proj = project_real_space(fine, torch.from_numpy(table.rotations)).numpy()
    m = proj.shape[-1]
    crop = slice(m // 2 - n // 2, m // 2 + n // 2)
    spec = fft_c(proj, (-2, -1))[:, crop, crop]
    k = (np.arange(n) - n // 2) / (n * pixel)
    kx, ky = np.meshgrid(k, k, indexing="xy")
    out = np.empty((len(table), n, n))
    for i in range(len(table)):
        ctf = ctf_numpy(n, pixel, table.defocus_u_a[i], table.defocus_v_a[i],
                        table.defocus_angle_rad[i], table.voltage_kv[i], table.cs_mm[i],
                        table.amplitude_contrast[i], table.phase_shift_rad[i], table.bfactor_a2[i])
        sx, sy = table.shifts_a[i]
        f = spec[i] * ctf * np.exp(-2j * np.pi * (kx * sx + ky * sy))
        f[0, :] = f[:, 0] = 0
        out[i] = ifft_c(f, (-2, -1)).real
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# -- data sets shared by several tests ---------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_and_clean(tmp_path_factory):
    """{snr_db: (noisy outdir, noise-free outdir)}: n=400, same seed, with and without noise."""
    root = tmp_path_factory.mktemp("snr")
    common = ["--n", "400", "--seed", "11", "--shift-sigma-a", "20", "--defocus-a", "12000"]
    sets = {}
    for snr in (-10.0, 0.0):
        noisy = root / f"noisy{snr:+.0f}"
        clean = root / f"clean{snr:+.0f}"
        simulate(noisy, *common, "--snr-db", str(snr))
        simulate(clean, *common, "--no-noise")
        sets[snr] = (noisy, clean)
    return sets


# -- tests -------------------------------------------------------------------------------------

def test_noise_free_images_match_independent_forward_model(tmp_path):
    out = tmp_path / "sim"
    # Strong defocus and astigmatism so that the CTF oscillates within a 32 px, 10 A box: a
    # wrong astigmatism angle (sign, +90 deg, ignored) or voltage drops the minimum correlation
    # to 0.97-0.99; the right model gives 0.9988 (measured).
    star = simulate(out, "--n", "12", "--no-noise", "--seed", "3", "--shift-sigma-a", "15",
                    "--defocus-a", "30000", "--astigmatism-a", "6000", "--bfactor", "1000",
                    "--voltage-kv", "200", "--cs-mm", "2.0", "--amplitude-contrast", "0.07")
    table, images = read_set(star)
    volume, voxel = read_volume(out / "ground_truth.mrc")
    assert volume.shape == (BOX,) * 3
    assert voxel == pytest.approx(10.0) and table.pixel_size_a == pytest.approx(10.0)
    assert np.ptp(table.shifts_a) > 10  # the shifts are exercised
    ref = reference_images(table, volume)
    corr = [correlation(ref[i], images[i]) for i in range(len(table))]
    assert min(corr) > 0.995, np.round(corr, 4)
    # Each image matches its own parameters, not a neighbour's.
    wrong = [correlation(ref[i], images[(i + 1) % len(table)]) for i in range(len(table))]
    assert max(wrong) < 0.8, np.round(wrong, 3)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0])
def test_measured_snr_matches_request(noisy_and_clean, snr_db):
    noisy_dir, clean_dir = noisy_and_clean[snr_db]
    t_noisy, noisy = read_set(noisy_dir / "particles.star")
    t_clean, clean = read_set(clean_dir / "particles.star")
    # Same seed: the noise-free part (poses, CTF, shifts) is identical, so the difference is noise.
    np.testing.assert_array_equal(t_noisy.rotations, t_clean.rotations)
    np.testing.assert_array_equal(t_noisy.shifts_a, t_clean.shifts_a)
    np.testing.assert_array_equal(t_noisy.defocus_u_a, t_clean.defocus_u_a)
    noise = noisy - clean
    signal_var = clean.var(axis=(-2, -1)).mean()
    noise_var = noise.var(axis=(-2, -1)).mean()
    assert signal_var > 0 and noise_var > 0
    measured = 10 * np.log10(signal_var / noise_var)
    assert abs(measured - snr_db) < 0.5, measured
    # The noise is white Gaussian, of the size the run reported.
    report = json.loads((noisy_dir / "simulation.json").read_text())
    assert np.sqrt(noise_var) == pytest.approx(report["noise_sigma"], rel=0.02)
    assert abs(noise.mean()) < 0.01 * np.sqrt(noise_var)
    power = (np.abs(fft_c(noise[:100], (-2, -1))) ** 2).mean(axis=0)
    radius = np.hypot(*np.meshgrid(np.arange(BOX) - BOX // 2, np.arange(BOX) - BOX // 2))
    assert power[radius < 6].mean() == pytest.approx(power[radius > 10].mean(), rel=0.15)
    assert abs(stats.kurtosis(noise.ravel()[:200_000])) < 0.1


def test_same_seed_is_reproducible_and_another_seed_differs(tmp_path):
    args = ["--n", "40", "--snr-db", "-5", "--shift-sigma-a", "10"]
    a = simulate(tmp_path / "a", *args, "--seed", "7").parent
    b = simulate(tmp_path / "b", *args, "--seed", "7").parent
    c = simulate(tmp_path / "c", *args, "--seed", "8").parent
    for x, y in zip(stacks(a), stacks(b), strict=True):
        assert x.name == y.name and mrc_content(x) == mrc_content(y)
    assert mrc_content(a / "ground_truth.mrc") == mrc_content(b / "ground_truth.mrc")
    def star_text(d: Path) -> list[str]:  # without the comment that holds the creation time
        return [x for x in (d / "particles.star").read_text().splitlines() if not x.startswith("#")]

    assert star_text(a) == star_text(b)
    ta, tb, tc = (load_particles(d / "particles.star") for d in (a, b, c))
    for name in ("rotations", "shifts_a", "defocus_u_a", "defocus_v_a", "defocus_angle_rad",
                 "voltage_kv", "cs_mm", "amplitude_contrast", "pixel_size_a", "stack_indices"):
        np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
    assert not np.allclose(ta.rotations, tc.rotations)
    assert not np.allclose(ta.defocus_u_a, tc.defocus_u_a)
    assert mrc_content(stacks(a)[0]) != mrc_content(stacks(c)[0])


def test_chunk_and_stack_size_do_not_change_results(tmp_path):
    args = ["--n", "30", "--seed", "5", "--snr-db", "-3", "--shift-sigma-a", "10"]
    small = simulate(tmp_path / "chunk7", *args, "--chunk-size", "7")
    big = simulate(tmp_path / "chunk512", *args, "--chunk-size", "512")
    split = simulate(tmp_path / "stack8", *args, "--stack-size", "8", "--chunk-size", "5")
    assert mrc_content(stacks(small.parent)[0]) == mrc_content(stacks(big.parent)[0])
    t_small, i_small = read_set(small)
    t_big, i_big = read_set(big)
    np.testing.assert_array_equal(i_small, i_big)
    np.testing.assert_array_equal(t_small.rotations, t_big.rotations)

    # Several stacks, whose references resolve, holding the same particles in the same order.
    assert [open_stack(p).shape[0] for p in stacks(split.parent)] == [8, 8, 8, 6]
    t_split = load_particles(split)
    ImageSource(t_split).validate()
    assert len(set(t_split.stack_paths.tolist())) == 4
    np.testing.assert_array_equal(t_split.stack_indices, np.arange(30) % 8)
    _, i_split = read_set(split)
    np.testing.assert_array_equal(i_split, i_big)


def test_parameter_distributions(noisy_and_clean):
    table = load_particles(noisy_and_clean[-10.0][0] / "particles.star")
    n = len(table)
    assert n == 400
    # Shifts: N(0, 20 A) per axis.
    assert table.shifts_a.std() == pytest.approx(20.0, rel=0.1)
    assert np.abs(table.shifts_a.mean(axis=0)).max() < 3.0
    # Rotations: proper, and uniform on SO(3) (mean matrix ~ 0, cos(tilt) uniform on [-1, 1]).
    np.testing.assert_allclose(np.linalg.det(table.rotations), 1.0, atol=1e-6)
    np.testing.assert_allclose(table.rotations @ table.rotations.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-6)
    assert np.abs(table.rotations.mean(axis=0)).max() < 0.15
    assert stats.kstest(table.rotations[:, 2, 2], stats.uniform(-1, 2).cdf).pvalue > 1e-3
    # Defocus: log-normal around 12000 A, astigmatic with U >= V.
    mean_def = 0.5 * (table.defocus_u_a + table.defocus_v_a)
    assert np.median(mean_def) == pytest.approx(12000, rel=0.08)
    assert np.std(np.log(mean_def)) == pytest.approx(0.3, rel=0.15)
    assert np.all(table.defocus_u_a >= table.defocus_v_a)
    assert np.all((table.defocus_angle_rad >= 0) & (table.defocus_angle_rad <= np.pi))


def test_atomic_model_gives_centred_positive_map(tmp_path, shared_data):
    import gemmi

    pdb = shared_data / "models" / "4AKE_adk_open_MDAnalysisTests.pdb"
    if not pdb.is_file():
        pytest.skip(f"{pdb} not found")
    out = tmp_path / "adk"
    rc = main(["simulate", "--model", str(pdb), "--pixel-size", "1.5", "--box", "64",
               "--n", "4", "--no-noise", "--device", "cpu", "--quiet", "--outdir", str(out)])
    assert rc == 0
    volume, voxel = read_volume(out / "ground_truth.mrc")
    assert volume.shape == (64, 64, 64) and voxel == pytest.approx(1.5)
    v = volume.astype(np.float64)
    # band-limited to the box (src/cryoai/simulate/atomic.py): the atoms' density rings a little
    # below 0 around them at 1.5 A (at -0.19 of the peak), but the map is a positive molecule
    assert v.sum() > 0 and v.max() > 0 and v.min() > -0.25 * v.max()
    assert v[v > 0].sum() > 5 * -v[v < 0].sum()
    zyx = np.indices(v.shape).reshape(3, -1)
    w = v.reshape(-1) / v.sum()
    centroid = zyx @ w
    np.testing.assert_allclose(centroid, [32, 32, 32], atol=1.0)
    # The map's second moments (x, y, z) match the atoms': axes are not swapped.
    xyz = (zyx[::-1] - centroid[::-1, None]) * 1.5
    cov_map = (xyz * w) @ xyz.T
    atoms = np.array([a.pos.tolist() for ch in gemmi.read_structure(str(pdb))[0]
                      for res in ch for a in res])
    cov_atoms = np.cov(atoms.T, bias=True)
    assert np.linalg.norm(cov_map - cov_atoms) < 0.1 * np.linalg.norm(cov_atoms)
    assert load_particles(out / "particles.star").box_px == 64
