"""Streaming simulator of particle data sets (RELION 3.1 STAR + MRC stacks + ground truth).

Image formation follows CONVENTIONS.md:
``F_image = CTF * F_proj(R) * exp(-2 pi i k . shift_a)`` plus white Gaussian noise in real
space. The SNR is the variance of the noise-free images over the variance of the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io.mrc import StackWriter, write_volume
from ..io.particles import ParticleTable, compact_column
from ..io.star import write_star
from ..physics.ctf import compute_ctf
from ..physics.fft import fft2_c, ifft2_c
from ..physics.grids import frequency_grid_2d
from ..physics.rotations import random_rotations
from ..physics.shifts import phase_shift
from .realism import RealismConfig
from .states import StateProjector, draw_states


@dataclass
class SimulationConfig:
    """Parameters of a simulated data set (units in the names)."""

    n_particles: int = 1000
    seed: int = 0
    snr_db: float | None = -10.0  # None: no noise
    shift_sigma_a: float = 0.0
    defocus_median_a: float = 15000.0
    defocus_log_sigma: float = 0.3
    astigmatism_sigma_a: float = 300.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_a2: float = 0.0
    chunk_size: int = 512
    stack_size: int = 100_000  # images per .mrcs file
    oversample: int = 2  # zero-padding factor of the projector
    snr_pilot_size: int = 512  # noise-free images used to measure the signal variance
    realism: RealismConfig | None = field(default=None)  # the realism layer (None: ideal particles)
    state_shares: tuple[float, ...] | None = None  # several maps: each one's share (None: one map)

    def to_dict(self) -> dict:
        """The parameters as plain values (JSON)."""
        out = dict(self.__dict__)
        out["realism"] = None if self.realism is None else self.realism.to_dict()
        return out


# Random streams. Every random number is tied to a particle index (never to a chunk), so the
# files do not depend on --chunk-size or --stack-size: parameters are drawn in fixed blocks of
# _PARAM_BLOCK particles, each from its own generator, and each image's noise from a generator
# seeded by a number drawn with that particle's parameters.
_PARAM_BLOCK = 1024
_STREAM_PARAMS, _STREAM_PILOT = 0, 1
_STREAM_STATES = 16  # + the parameters' stream: each particle's state (several maps)


def _generator(seed: int, stream: int, block: int) -> torch.Generator:
    # SeedSequence hashes (seed, stream, block): distinct seeds and streams do not overlap.
    state = np.random.SeedSequence([int(seed) % 2**64, stream, block]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _sample_block(cfg: SimulationConfig, stream: int, block: int) -> dict:
    g = _generator(cfg.seed, stream, block)
    p = _PARAM_BLOCK
    rotations = random_rotations(p, generator=g, dtype=torch.float64)
    shifts = torch.randn(p, 2, generator=g, dtype=torch.float64) * cfg.shift_sigma_a
    log_def = torch.randn(p, generator=g, dtype=torch.float64) * cfg.defocus_log_sigma
    mean_def = cfg.defocus_median_a * torch.exp(log_def)
    astig = torch.randn(p, generator=g, dtype=torch.float64).abs() * cfg.astigmatism_sigma_a
    angle = torch.rand(p, generator=g, dtype=torch.float64) * math.pi
    noise_seeds = torch.randint(0, 2**62, (p,), generator=g, dtype=torch.int64)
    return {
        "rotations": rotations.numpy(),
        "shifts_a": shifts.numpy(),
        "defocus_u_a": (mean_def + astig / 2).numpy(),
        "defocus_v_a": (mean_def - astig / 2).numpy(),
        "defocus_angle_rad": angle.numpy(),
        "noise_seeds": noise_seeds.numpy(),
        **({} if not cfg.state_shares or len(cfg.state_shares) < 2 else {
            "state": draw_states(_generator(cfg.seed, _STREAM_STATES + stream, block), p,
                                 np.asarray(cfg.state_shares))}),
    }


def sample_parameters(cfg: SimulationConfig, start: int, count: int, *,
                      stream: int = _STREAM_PARAMS) -> dict:
    """Draw the poses and CTF parameters of particles ``start .. start+count``.

    The values of particle ``i`` depend only on ``cfg``, ``stream`` and ``i``.

    Returns a dict of numpy arrays: rotations (count, 3, 3), shifts_a (count, 2),
    defocus_u_a, defocus_v_a, defocus_angle_rad (count,) float64, noise_seeds (count,)
    int64 (the seed of each image's noise), and with several maps (``cfg.state_shares``) state
    (count,) int64, each particle's map (from its own stream: the other values do not change).
    """
    parts = []
    for block in range(start // _PARAM_BLOCK, (start + count - 1) // _PARAM_BLOCK + 1):
        values = _sample_block(cfg, stream, block)
        lo = max(start, block * _PARAM_BLOCK) - block * _PARAM_BLOCK
        hi = min(start + count, (block + 1) * _PARAM_BLOCK) - block * _PARAM_BLOCK
        parts.append({k: v[lo:hi] for k, v in values.items()})
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _noise(params: dict, n: int) -> torch.Tensor:
    """Unit white Gaussian noise (count, n, n) float32, each image from its own seed."""
    out = torch.empty(len(params["noise_seeds"]), n, n, dtype=torch.float32)
    for i, s in enumerate(params["noise_seeds"].tolist()):
        out[i] = torch.randn(n, n, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
    return out


class _Renderer:
    """Noise-free images of one volume (or one per state) for batches of poses and CTFs."""

    def __init__(self, volumes: list[np.ndarray], pixel_size_a: float, cfg: SimulationConfig, device):
        self.n = volumes[0].shape[-1]
        self.cfg = cfg
        self.pixel_size_a = pixel_size_a
        self.device = device
        self.projector = StateProjector(volumes, cfg.oversample, device)
        self.freqs_a = frequency_grid_2d(self.n, pixel_size_a, device=device, dtype=torch.float32)

    def render(self, params: dict) -> torch.Tensor:
        cfg = self.cfg
        dev = self.device
        proj = self.projector.project(params["rotations"], params.get("state"))
        ctf = compute_ctf(
            self.freqs_a,
            torch.as_tensor(params["defocus_u_a"], dtype=torch.float32, device=dev),
            torch.as_tensor(params["defocus_v_a"], dtype=torch.float32, device=dev),
            torch.as_tensor(params["defocus_angle_rad"], dtype=torch.float32, device=dev),
            cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast, 0.0, cfg.bfactor_a2,
        )
        shifts = torch.as_tensor(params["shifts_a"], dtype=torch.float32, device=dev)
        spec = fft2_c(proj) * ctf * phase_shift(self.freqs_a, shifts)
        return ifft2_c(spec).real


def write_states(outdir: Path, volumes: list[np.ndarray], pixel_size_a: float, states: np.ndarray) -> dict:
    """Each state's map (``ground_truth_state_NNN.mrc``, numbered from 1 as ``truth.csv``'s
    ``state``) and the simulation report's entries for the states (their number and counts).
    """
    for k, v in enumerate(volumes):
        write_volume(outdir / f"ground_truth_state_{k + 1:03d}.mrc", np.asarray(v, dtype=np.float32),
                     pixel_size_a)
    return {"states": len(volumes), "state_counts": np.bincount(states, minlength=len(volumes)).tolist()}


def simulate_dataset(
    volume: np.ndarray | list[np.ndarray],
    pixel_size_a: float,
    outdir: str | Path,
    cfg: SimulationConfig,
    *,
    device: str | torch.device = "cpu",
    progress=None,
) -> dict:
    """Simulate a particle set and write it to ``outdir``.

    Writes ``outdir/particles.star`` (RELION 3.1 with the true poses, shifts and CTF),
    ``outdir/particles_XXX.mrcs`` stacks of at most ``cfg.stack_size`` images, and
    ``outdir/ground_truth.mrc``. Work is streamed in chunks of ``cfg.chunk_size`` images so
    memory does not grow with ``cfg.n_particles`` (beyond the metadata table).

    Parameters
    ----------
    volume : (N, N, N) float array [z, y, x], N even; or a list of K such maps (several
        structures: each particle is the image of one, drawn with ``cfg.state_shares``; its state
        goes to ``truth.csv``, each map to ``ground_truth_state_NNN.mrc``).
    pixel_size_a : voxel size in Angstrom.
    outdir : output directory (created).
    cfg : the simulation parameters.
    device : torch device for the projections.
    progress : optional callable ``progress(n_done)``.

    Returns
    -------
    dict with ``star_path``, ``signal_variance``, ``noise_sigma`` and ``snr_db_measured``
    (measured on the images written, from the noise actually drawn). With ``cfg.realism``, the
    realism layer's simulation and its report
    (:func:`cryoai.simulate.realistic.simulate_realistic`).
    """
    volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    if len(volumes) > 1 and (cfg.state_shares is None or len(cfg.state_shares) != len(volumes)):
        raise ValueError(f"{len(volumes)} maps need {len(volumes)} state_shares (got {cfg.state_shares})")
    if cfg.realism is not None:
        from .realistic import simulate_realistic

        return simulate_realistic(volumes, pixel_size_a, outdir, cfg, device=device, progress=progress)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    n = volumes[0].shape[-1]
    renderer = _Renderer(volumes, pixel_size_a, cfg, torch.device(device))

    # Signal variance from a pilot set drawn with its own stream (same seed -> same value).
    noise_sigma = 0.0
    signal_variance = float("nan")
    if cfg.snr_db is not None:
        pilot = sample_parameters(cfg, 0, min(cfg.snr_pilot_size, max(cfg.n_particles, 64)),
                                  stream=_STREAM_PILOT)
        pilot_images = renderer.render(pilot)
        signal_variance = float(pilot_images.double().var(dim=(-2, -1)).mean())
        noise_sigma = math.sqrt(signal_variance / 10 ** (cfg.snr_db / 10))

    n_total = cfg.n_particles
    columns = {k: np.empty(n_total, dtype=np.float32)
               for k in ("defocus_u_a", "defocus_v_a", "defocus_angle_rad")}
    rotations = np.empty((n_total, 3, 3), dtype=np.float32)
    shifts_a = np.empty((n_total, 2), dtype=np.float32)
    stack_files: list[str] = []
    stack_ids = np.empty(n_total, dtype=np.int32)
    stack_indices = np.empty(n_total, dtype=np.int32)
    states = np.zeros(n_total, dtype=np.int64)

    sum_signal_var = 0.0
    sum_noise_var = 0.0
    n_stacks = max(1, math.ceil(n_total / cfg.stack_size))
    digits = max(3, len(str(n_stacks - 1)))
    done = 0
    for stack_id in range(n_stacks):
        s_start = stack_id * cfg.stack_size
        s_count = min(cfg.stack_size, n_total - s_start)
        stack_path = (outdir / f"particles_{stack_id:0{digits}d}.mrcs").resolve()
        stack_files.append(str(stack_path))
        with StackWriter(stack_path, s_count, n, pixel_size_a) as writer:
            for c_start in range(0, s_count, cfg.chunk_size):
                count = min(cfg.chunk_size, s_count - c_start)
                start = s_start + c_start
                params = sample_parameters(cfg, start, count)
                clean = renderer.render(params)
                images = clean
                if cfg.snr_db is not None:
                    noise = (_noise(params, n) * noise_sigma).to(clean.device)
                    images = clean + noise
                    sum_noise_var += float(noise.double().var(dim=(-2, -1)).sum())
                sum_signal_var += float(clean.double().var(dim=(-2, -1)).sum())
                writer.write(c_start, images.cpu().numpy().astype(np.float32))
                sl = slice(start, start + count)
                rotations[sl] = params["rotations"]
                shifts_a[sl] = params["shifts_a"]
                states[sl] = params.get("state", 0)
                for k in columns:
                    columns[k][sl] = params[k]
                stack_ids[sl] = stack_id
                stack_indices[sl] = np.arange(c_start, c_start + count)
                done += count
                if progress is not None:
                    progress(count)

    def full(value: float) -> np.ndarray:
        return compact_column(float(value), n_total)

    table = ParticleTable(
        stack_files=tuple(stack_files),
        stack_ids=stack_ids,
        stack_indices=stack_indices,
        box_px=n,
        pixel_size_a=full(pixel_size_a),
        defocus_u_a=columns["defocus_u_a"],
        defocus_v_a=columns["defocus_v_a"],
        defocus_angle_rad=columns["defocus_angle_rad"],
        voltage_kv=full(cfg.voltage_kv),
        cs_mm=full(cfg.cs_mm),
        amplitude_contrast=full(cfg.amplitude_contrast),
        phase_shift_rad=full(0.0),
        bfactor_a2=full(cfg.bfactor_a2),
        rotations=rotations,
        shifts_a=shifts_a,
    )
    star_path = outdir / "particles.star"
    write_star(star_path, table)
    write_volume(outdir / "ground_truth.mrc", np.asarray(volumes[0], dtype=np.float32), pixel_size_a)
    extra = {}
    if len(volumes) > 1:
        extra = write_states(outdir, volumes, pixel_size_a, states)
        pd.DataFrame({"particle": np.arange(1, n_total + 1), "state": states + 1}).to_csv(
            outdir / "truth.csv", index=False)
    measured = (10 * math.log10(sum_signal_var / sum_noise_var) if sum_noise_var > 0
                else float("inf"))
    return {
        "star_path": str(star_path),
        "n_particles": n_total,
        "signal_variance": signal_variance,
        "noise_sigma": noise_sigma,
        "snr_db_measured": measured,
        **extra,
    }
