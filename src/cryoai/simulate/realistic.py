"""Simulation with the realism layer (:mod:`.realism`): micrographs, junk, view distributions,
structural and coloured noise, off-centre shifts, rendering at a finer pixel and RELION-like
output.

Every random value of particle ``i`` depends only on the seed, its stream and ``i`` (drawn in
fixed blocks, as in :mod:`.simulator`), and each block draws every value whatever the switches,
so that turning one nuisance on leaves the others' values (poses, CTFs, noise) as they were:
the sets of an ablation differ only by the nuisance switched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io.mrc import StackWriter, write_volume
from ..io.particles import ParticleTable, compact_column
from ..io.star import write_star
from ..physics.ctf import compute_ctf
from ..physics.fft import (
    fft2_c,
    fourier_crop_2d,
    fourier_crop_3d,
    ifft2_c,
)
from ..physics.grids import frequency_grid_2d
from ..physics.rotations import random_rotations
from ..physics.shifts import phase_shift
from .realism import (
    JUNK_KINDS,
    RealismConfig,
    background_normalise,
    cut_partial,
    gaussian_blobs,
    lowpass_noise,
    micrograph_sizes,
    micrograph_values,
    particle_disk,
    particle_radius_px,
)
from .simulator import (
    _PARAM_BLOCK,
    _STREAM_PARAMS,
    _STREAM_PILOT,
    _generator,
    sample_parameters,
    write_states,
)
from .states import StateProjector
from .views import sample_views, sampling_compensation_factor

_STREAM_REALISM, _STREAM_PILOT_REALISM, _STREAM_MICROGRAPHS, _STREAM_PILOT_MICROGRAPHS = 2, 3, 4, 5
_MAX_BLOBS = 8


def _block_values(cfg, rc: RealismConfig, stream: int, block: int, box_px: int) -> dict:
    """Every per-particle random value of the realism layer for one block of particles."""
    g = _generator(cfg.seed, stream, block)
    p = _PARAM_BLOCK
    views = sample_views(p, rc.views, g, axis=rc.view_axis, fraction=rc.cluster_fraction,
                         kappa=rc.cluster_kappa, cone_half_angle_deg=rc.cone_half_angle_deg,
                         uniform_fraction=rc.cone_uniform_fraction)
    f64 = torch.float64

    def uniform(*shape):
        return torch.rand(*shape, generator=g, dtype=f64)

    def unit_2d(angle):
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)

    junk_u = uniform(p)
    kind_u = uniform(p)
    tail_u = uniform(p)
    tail_shift = (uniform(p, 2) * 2 - 1) * rc.shift_tail_box_frac * box_px  # px, converted later
    jitter = torch.randn(p, generator=g, dtype=f64) * rc.defocus_jitter_a
    cut_direction = unit_2d(uniform(p) * 2 * math.pi)
    cut_fraction = 0.30 + 0.15 * uniform(p)
    neighbour_rot = random_rotations(p, generator=g, dtype=f64)
    neighbour_offset = unit_2d(uniform(p) * 2 * math.pi) * (1.0 + 0.6 * uniform(p))[:, None]  # radii
    n_blobs = 3 + (uniform(p) * 6).long()  # 3..8
    blob_radius = 0.7 * uniform(p, _MAX_BLOBS).sqrt()
    blob_centres = unit_2d(uniform(p, _MAX_BLOBS) * 2 * math.pi) * blob_radius[..., None]
    blob_sigmas = 0.15 + 0.2 * uniform(p, _MAX_BLOBS)  # radii
    blob_weights = uniform(p, _MAX_BLOBS) * (torch.arange(_MAX_BLOBS)[None] < n_blobs[:, None])
    blob_mass = 0.7 + 0.6 * uniform(p)
    off_centre = unit_2d(uniform(p) * 2 * math.pi) * (0.25 + 0.15 * uniform(p))[:, None]  # boxes
    seeds = torch.randint(0, 2**62, (p, 2), generator=g, dtype=torch.int64)

    shares = np.cumsum(rc.junk_shares())
    kind = np.searchsorted(shares, kind_u.numpy(), side="right").clip(max=len(JUNK_KINDS) - 1)
    junk = junk_u.numpy() < rc.junk_fraction
    return {
        "view_rotations": views.numpy(), "junk_kind": np.where(junk, kind, -1).astype(np.int64),
        "tail": (tail_u < rc.shift_tail_fraction).numpy(), "tail_shift_px": tail_shift.numpy(),
        "defocus_jitter_a": jitter.numpy(), "cut_direction": cut_direction.numpy(),
        "cut_fraction": cut_fraction.numpy(), "neighbour_rotations": neighbour_rot.numpy(),
        "neighbour_offset_radii": neighbour_offset.numpy(), "blob_centres_radii": blob_centres.numpy(),
        "blob_sigmas_radii": blob_sigmas.numpy(), "blob_weights": blob_weights.numpy(),
        "blob_mass": blob_mass.numpy(), "off_centre_boxes": off_centre.numpy(), "extra_seeds": seeds.numpy(),
    }


def realistic_parameters(cfg, start: int, count: int, box_px: int, *, pilot: bool = False) -> dict:
    """The base parameters (:func:`cryoai.simulate.simulator.sample_parameters`) of particles
    ``start .. start+count`` with the realism layer's own values added.
    """
    rc: RealismConfig = cfg.realism
    base = sample_parameters(cfg, start, count, stream=_STREAM_PILOT if pilot else _STREAM_PARAMS)
    stream = _STREAM_PILOT_REALISM if pilot else _STREAM_REALISM
    parts = []
    for block in range(start // _PARAM_BLOCK, (start + count - 1) // _PARAM_BLOCK + 1):
        values = _block_values(cfg, rc, stream, block, box_px)
        lo = max(start, block * _PARAM_BLOCK) - block * _PARAM_BLOCK
        hi = min(start + count, (block + 1) * _PARAM_BLOCK) - block * _PARAM_BLOCK
        parts.append({k: v[lo:hi] for k, v in values.items()})
    extra = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    if pilot:
        extra["junk_kind"][:] = -1
    base.update(extra)
    if rc.views != "uniform":
        base["rotations"] = extra["view_rotations"]
    return base


class RealisticRenderer:
    """Images of one map with the realism layer, and the noise-free parts the SNR is measured on.

    Parameters
    ----------
    volumes : (N, N, N) the map, or a list of maps (one per state: each particle is the image of
        its own, ``params["state"]``); ``pixel_size_a`` their voxel size.
    cfg : the :class:`cryoai.simulate.SimulationConfig` (with ``realism``).
    device : torch device.
    """

    def __init__(self, volumes, pixel_size_a: float, cfg, device):
        self.cfg = cfg
        self.rc: RealismConfig = cfg.realism
        volumes = list(volumes) if isinstance(volumes, (list, tuple)) else [volumes]
        self.n = volumes[0].shape[-1]
        self.out_n = self.rc.output_box_px or self.n
        if self.out_n > self.n:
            raise ValueError(f"output_box_px {self.out_n} is larger than the map's box {self.n}")
        self.pixel_size_a = pixel_size_a
        self.out_pixel_size_a = pixel_size_a * self.n / self.out_n
        self.device = device
        self.projector = StateProjector(volumes, cfg.oversample, device)
        self.freqs_a = frequency_grid_2d(self.n, pixel_size_a, device=device, dtype=torch.float32)
        self.radius_px = max(particle_radius_px(v) for v in volumes)
        self.out_disk = particle_disk(self.out_n, self.radius_px * self.out_n / self.n, device=device)
        self.structural_sigma = 0.0
        self.noise_sigma = 0.0

    def _project(self, rotations: np.ndarray, states: np.ndarray | None = None) -> torch.Tensor:
        return self.projector.project(rotations, states)

    def _shift(self, images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs_a * self.pixel_size_a
        return ifft2_c(fft2_c(images) * phase_shift(freqs, shifts_px.to(images.dtype))).real

    def projections(self, params: dict) -> torch.Tensor:
        """Pre-CTF images (B, N, N) with the junk made: the particle, or what the pick holds."""
        dev = self.device
        states = params.get("state")
        proj = self._project(params["rotations"], states)
        kind = params["junk_kind"]
        name = {k: i for i, k in enumerate(JUNK_KINDS)}
        r = self.radius_px
        rows = np.flatnonzero(kind == name["partial"])
        if len(rows):
            proj[rows] = cut_partial(proj[rows], torch.as_tensor(params["cut_direction"][rows], device=dev),
                                     torch.as_tensor(params["cut_fraction"][rows], device=dev))
        rows = np.flatnonzero(kind == name["neighbour"])
        if len(rows):
            other = self._project(params["neighbour_rotations"][rows],
                                  None if states is None else states[rows])
            offset = torch.as_tensor(params["neighbour_offset_radii"][rows] * r, device=dev)
            proj[rows] = proj[rows] + self._shift(other, offset)
        rows = np.flatnonzero(kind == name["blob"])
        if len(rows):
            mass = proj[rows].clamp_min(0).sum(dim=(-2, -1))  # the particle's projected mass
            w = torch.as_tensor(params["blob_weights"][rows], device=dev, dtype=torch.float32)
            w = w / w.sum(-1, keepdim=True) * (mass * torch.as_tensor(params["blob_mass"][rows], device=dev,
                                                                           dtype=torch.float32))[:, None]
            proj[rows] = gaussian_blobs(torch.as_tensor(params["blob_centres_radii"][rows] * r, device=dev,
                                                        dtype=torch.float32),
                                        torch.as_tensor(params["blob_sigmas_radii"][rows] * r, device=dev,
                                                        dtype=torch.float32), w, self.n)
        rows = np.flatnonzero(kind == name["empty"])
        if len(rows):
            proj[rows] = 0.0
        return proj

    def shifts_a(self, params: dict) -> np.ndarray:
        """The particles' shifts (B, 2) Angstrom: Gaussian, the tail's, plus the off-centre picks'."""
        shifts = np.array(params["shifts_a"], dtype=np.float64)
        tail = params["tail"]
        shifts[tail] = params["tail_shift_px"][tail] * self.pixel_size_a
        off = params["junk_kind"] == JUNK_KINDS.index("off_centre")
        shifts[off] += params["off_centre_boxes"][off] * self.n * self.pixel_size_a
        return shifts

    def ctf(self, params: dict, micrographs: dict) -> torch.Tensor:
        """The particles' CTFs (B, N, N): their micrograph's defocus, astigmatism and B-factor
        (and each particle's defocus jitter), or their own defocus without micrographs. The values
        used are recorded in ``params`` (``defocus_u_a``, ``defocus_v_a``, ``defocus_angle_rad``,
        ``bfactor_true_a2``).
        """
        dev = self.device
        rc = self.rc
        if rc.micrographs:
            mic = params["micrograph"]
            mean = micrographs["defocus_a"][mic] + params["defocus_jitter_a"]
            astig = micrographs["astigmatism_a"][mic]
            du, dv, angle = mean + astig / 2, mean - astig / 2, micrographs["angle_rad"][mic]
            bfactor = micrographs["bfactor_a2"][mic]
        else:
            du, dv, angle = params["defocus_u_a"], params["defocus_v_a"], params["defocus_angle_rad"]
            bfactor = np.full(len(du), self.cfg.bfactor_a2)
        params["defocus_u_a"], params["defocus_v_a"], params["defocus_angle_rad"] = du, dv, angle
        params["bfactor_true_a2"] = np.asarray(bfactor, dtype=np.float64)

        def t(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=dev)

        return compute_ctf(self.freqs_a, t(du), t(dv), t(angle), self.cfg.voltage_kv, self.cfg.cs_mm,
                           self.cfg.amplitude_contrast, 0.0, t(bfactor))

    def signal_and_structure(self, params: dict, micrographs: dict):
        """The noise-free particle images and the structural noise's images (B, M, M) at the
        output box, after the CTF, the shifts and the micrographs' intensity scale.
        """
        dev = self.device
        proj = self.projections(params)
        ctf = self.ctf(params, micrographs)
        shifts = torch.as_tensor(self.shifts_a(params), dtype=torch.float32, device=dev)
        transfer = ctf * phase_shift(self.freqs_a, shifts)
        scale = torch.ones(len(proj), device=dev)
        if self.rc.micrographs:
            scale = torch.as_tensor(micrographs["intensity_scale"][params["micrograph"]], dtype=torch.float32,
                                    device=dev)
        signal = ifft2_c(fft2_c(proj) * transfer).real * scale[:, None, None]
        structure = torch.zeros_like(signal)
        if self.structural_sigma > 0:
            white = _seeded_noise(params["extra_seeds"][:, 0], self.n).to(dev)
            structure = ifft2_c(fft2_c(white * self.structural_sigma) * transfer).real * scale[:, None, None]
        return self._crop(signal), self._crop(structure)

    def noise(self, params: dict, micrographs: dict) -> torch.Tensor:
        """Unit-sd-scaled noise at the output box (times the micrographs' noise scale): white,
        with a share ``noise_colour`` of its power low-passed.
        """
        dev = self.device
        white = _seeded_noise(params["noise_seeds"], self.n).to(dev)
        c = self.rc.noise_colour
        if c > 0:
            low = lowpass_noise(_seeded_noise(params["extra_seeds"][:, 1], self.n).to(dev))
            white = math.sqrt(1 - c) * white + math.sqrt(c) * low
        if self.rc.micrographs:
            scale = micrographs["noise_scale"][params["micrograph"]]
            white = white * torch.as_tensor(scale, dtype=torch.float32, device=dev)[:, None, None]
        return self._crop(white)

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.out_n == self.n else fourier_crop_2d(images, self.out_n)

    def signal_measures(self, signal: torch.Tensor) -> dict:
        """Per-image sums of the SNR's three numerators: variance (box), mean power within the
        particle's radius (masked), summed power (integrated).
        """
        s = signal.double()
        return {"box": s.var(dim=(-2, -1)), "masked": (s[:, self.out_disk] ** 2).mean(dim=-1),
                "integrated": (s ** 2).sum(dim=(-2, -1))}


def _seeded_noise(seeds: np.ndarray, n: int) -> torch.Tensor:
    out = torch.empty(len(seeds), n, n, dtype=torch.float32)
    for i, s in enumerate(np.asarray(seeds).tolist()):
        out[i] = torch.randn(n, n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
    return out


def _micrographs(cfg, n_particles: int, stream: int) -> tuple[np.ndarray, dict]:
    """The micrograph of each particle and the micrographs' shared values."""
    rc: RealismConfig = cfg.realism
    sizes = micrograph_sizes(n_particles, rc.particles_per_micrograph, _generator(cfg.seed, stream, 0))
    values = micrograph_values(rc, len(sizes), _generator(cfg.seed, stream, 1))
    return np.repeat(np.arange(len(sizes)), sizes), values


def simulate_realistic(volume, pixel_size_a: float, outdir: str | Path, cfg, *,
                       device: str | torch.device = "cpu", progress=None) -> dict:
    """:func:`cryoai.simulate.simulate_dataset` with ``cfg.realism`` set (same outputs, plus
    ``truth.csv``: each particle's micrograph, kind (``particle`` or a junk kind) and the values a
    method is not told: B-factor, intensity and noise scale; with several maps (a list), each
    particle's ``state``).

    Returns
    -------
    dict with the star path, the SNR measured three ways on the real particles
    (``snr_db_box``, ``snr_db_masked``, ``isnr`` and ``isnr_db``; ``snr_db_measured`` is the one
    of ``snr_definition``), the noise and structural-noise sds, the junk counts per kind, the
    number of micrographs, the SCF of the real particles' views and the particle radius.
    """
    rc: RealismConfig = cfg.realism
    rc.validate()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    renderer = RealisticRenderer(volumes, pixel_size_a, cfg, device)
    n_total, n, out_n = cfg.n_particles, renderer.n, renderer.out_n

    mic_of, mic_values = _micrographs(cfg, n_total, _STREAM_MICROGRAPHS)
    # The pilot: real particles only, each on its own micrograph (so that the signal level is
    # averaged over the micrographs' spread, not over a few of them).
    n_pilot = min(cfg.snr_pilot_size, max(n_total, 64))
    pilot = realistic_parameters(cfg, 0, n_pilot, n, pilot=True)
    pilot_mics = micrograph_values(rc, n_pilot, _pilot_generator(cfg))
    pilot["micrograph"] = np.arange(n_pilot)
    if rc.structural_snr is not None:
        proj = renderer.projections(pilot)
        power = float(proj.double().var(dim=(-2, -1)).mean())
        renderer.structural_sigma = math.sqrt(power / rc.structural_snr)
    noise_sigma = 0.0
    if cfg.snr_db is not None:
        signal, _ = renderer.signal_and_structure(pilot, pilot_mics)
        numerator = float(renderer.signal_measures(signal)[rc.snr_definition].mean())
        if rc.micrographs:  # the set's ratio of sums, with its own micrographs' scales
            numerator *= (float((mic_values["intensity_scale"][mic_of] ** 2).mean())
                          / float((mic_values["noise_scale"][mic_of] ** 2).mean()))
            numerator /= float((pilot_mics["intensity_scale"] ** 2).mean())  # the pilot's own scales
        unit_noise_var = float(renderer.noise(pilot, {**pilot_mics, "noise_scale": np.ones(n_pilot)})
                               .double().var(dim=(-2, -1)).mean())
        noise_sigma = math.sqrt(numerator / 10 ** (cfg.snr_db / 10) / unit_noise_var)

    rotations = np.empty((n_total, 3, 3), dtype=np.float32)
    shifts_a = np.empty((n_total, 2), dtype=np.float32)
    ctf_cols = {k: np.empty(n_total, dtype=np.float32)
                for k in ("defocus_u_a", "defocus_v_a", "defocus_angle_rad")}
    kinds = np.empty(n_total, dtype=np.int64)
    states = np.zeros(n_total, dtype=np.int64)
    bfactor_true = np.empty(n_total, dtype=np.float32)
    sums = {"box": 0.0, "masked": 0.0, "integrated": 0.0, "noise": 0.0}
    stack_files, stack_ids, stack_indices = [], np.empty(n_total, np.int32), np.empty(n_total, np.int32)
    n_stacks = max(1, math.ceil(n_total / cfg.stack_size))
    digits = max(3, len(str(n_stacks - 1)))
    for stack_id in range(n_stacks):
        s_start = stack_id * cfg.stack_size
        s_count = min(cfg.stack_size, n_total - s_start)
        stack_path = (outdir / f"particles_{stack_id:0{digits}d}.mrcs").resolve()
        stack_files.append(str(stack_path))
        with StackWriter(stack_path, s_count, out_n, renderer.out_pixel_size_a,
                         float16=rc.float16) as writer:
            for c_start in range(0, s_count, cfg.chunk_size):
                count = min(cfg.chunk_size, s_count - c_start)
                start = s_start + c_start
                params = realistic_parameters(cfg, start, count, n)
                params["micrograph"] = mic_of[start:start + count]
                signal, structure = renderer.signal_and_structure(params, mic_values)
                images = signal + structure
                real = torch.as_tensor(params["junk_kind"] < 0, device=images.device)
                if noise_sigma > 0:
                    noise = renderer.noise(params, mic_values) * noise_sigma
                    images = images + noise
                    sums["noise"] += float(noise[real].double().var(dim=(-2, -1)).sum())
                for key, value in renderer.signal_measures(signal[real]).items():
                    sums[key] += float(value.sum())
                if rc.normalise:
                    images = background_normalise(images)
                writer.write(c_start, images.cpu().numpy())
                sl = slice(start, start + count)
                rotations[sl] = params["rotations"]
                shifts_a[sl] = renderer.shifts_a(params)
                for k in ctf_cols:
                    ctf_cols[k][sl] = params[k]
                kinds[sl] = params["junk_kind"]
                states[sl] = params.get("state", 0)
                bfactor_true[sl] = params["bfactor_true_a2"]
                stack_ids[sl] = stack_id
                stack_indices[sl] = np.arange(c_start, c_start + count)
                if progress is not None:
                    progress(count)

    def full(value: float) -> np.ndarray:
        return compact_column(float(value), n_total)

    table = ParticleTable(
        stack_files=tuple(stack_files), stack_ids=stack_ids, stack_indices=stack_indices, box_px=out_n,
        pixel_size_a=full(renderer.out_pixel_size_a), defocus_u_a=ctf_cols["defocus_u_a"],
        defocus_v_a=ctf_cols["defocus_v_a"], defocus_angle_rad=ctf_cols["defocus_angle_rad"],
        voltage_kv=full(cfg.voltage_kv), cs_mm=full(cfg.cs_mm),
        amplitude_contrast=full(cfg.amplitude_contrast),
        phase_shift_rad=full(0.0), bfactor_a2=full(0.0 if rc.micrographs else cfg.bfactor_a2),
        rotations=rotations, shifts_a=shifts_a,
    )
    names = np.array([f"micrographs/micrograph_{m:05d}.mrc" for m in range(int(mic_of.max()) + 1)]) \
        if rc.micrographs else None
    star_path = outdir / "particles.star"
    write_star(star_path, table,
               extra_columns=None if names is None else {"rlnMicrographName": names[mic_of]})
    kind_names = np.array(["particle", *JUNK_KINDS])[kinds + 1]
    truth = pd.DataFrame({
        "particle": np.arange(1, n_total + 1), "micrograph": mic_of if rc.micrographs else -1,
        "kind": kind_names,
        "bfactor_a2": bfactor_true,
        "intensity_scale": mic_values["intensity_scale"][mic_of] if rc.micrographs else 1.0,
        "noise_scale": mic_values["noise_scale"][mic_of] if rc.micrographs else 1.0,
    })
    if len(volumes) > 1:
        truth["state"] = states + 1
    truth.to_csv(outdir / "truth.csv", index=False)

    def at_output_box(v: np.ndarray) -> np.ndarray:
        gt = torch.as_tensor(np.asarray(v, dtype=np.float64))
        return (gt if out_n == n else fourier_crop_3d(gt, out_n)).float().numpy()

    write_volume(outdir / "ground_truth.mrc", at_output_box(volumes[0]), renderer.out_pixel_size_a)
    extra = {} if len(volumes) == 1 else write_states(outdir, [at_output_box(v) for v in volumes],
                                                       renderer.out_pixel_size_a, states)

    real = kinds < 0

    def db(x: float) -> float:
        return 10 * math.log10(x) if x > 0 and math.isfinite(x) else float("inf")

    noise_var = sums["noise"]
    ratios = {k: (sums[k] / noise_var if noise_var > 0 else float("inf"))
              for k in ("box", "masked", "integrated")}
    measured = {k: db(v) for k, v in ratios.items()}
    return {
        "star_path": str(star_path), "n_particles": n_total, "box_px": out_n,
        "pixel_size_a": renderer.out_pixel_size_a,
        "noise_sigma": noise_sigma, "structural_noise_sigma": renderer.structural_sigma,
        "snr_definition": rc.snr_definition, "snr_db_measured": measured[rc.snr_definition],
        "snr_db_box": measured["box"], "snr_db_masked": measured["masked"],
        "isnr": ratios["integrated"], "isnr_db": measured["integrated"],
        "junk": {k: int((kinds == i).sum()) for i, k in enumerate(JUNK_KINDS)},
        "real_particles": int(real.sum()),
        "micrographs": int(mic_of.max()) + 1 if rc.micrographs else 0,
        "views_scf": sampling_compensation_factor(rotations[real]) if real.any() else float("nan"),
        "particle_radius_px": renderer.radius_px * out_n / n,
        "realism": rc.to_dict(),
        **extra,
    }


def _pilot_generator(cfg) -> torch.Generator:
    return _generator(cfg.seed, _STREAM_PILOT_MICROGRAPHS, 0)


__all__ = ["RealisticRenderer", "realistic_parameters", "simulate_realistic"]
