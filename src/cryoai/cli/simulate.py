"""Simulate a particle data set from a map or an atomic model.

Writes OUTDIR/particles.star (RELION 3.1 with the true poses, shifts and CTF), the .mrcs
stacks it references and OUTDIR/ground_truth.mrc. Rotations are uniform on SO(3), shifts
Gaussian, defocus log-normal with astigmatism, white Gaussian noise at the requested SNR
(variance of the noise-free images over the variance of the noise). Streams in chunks, so
memory stays bounded for millions of particles; the same seed gives the same files.

The realism layer (docs/simulation.md) adds, each by a switch: micrographs of particles that
share their CTF, noise and scale; junk picks of five kinds; preferred views; structural and
coloured noise; an off-centre tail of shifts; rendering at the map's finer pixel then
Fourier-cropping to --output-box; RELION-like output (background normalised, float16). A recipe
(--recipe) turns them on together; flags given with it override it. The truth of what a method
is not told (junk, micrographs' B-factor and scales) goes to OUTDIR/truth.csv.

Several structures: several --map (or --model) make a mixture, each particle the image of one
of them drawn with --shares; two --model with --trajectory-states K make the K states of a
motion between them (the shared atoms moved in a straight line). Each particle's state goes to
OUTDIR/truth.csv, each state's map to OUTDIR/ground_truth_state_NNN.mrc.

Example: cryoai simulate --map map.mrc --n 10000 --snr-db -10 --outdir sim/
         cryoai simulate --recipe large-complex --n 12000 --outdir sim-a/
         cryoai simulate --map a.mrc b.mrc c.mrc --shares 0.5,0.3,0.2 --n 15000 --outdir mix/
         cryoai simulate --model open.pdb closed.pdb --trajectory-states 20 --pixel-size 3
             --box 64 --outdir motion/   (one command)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .common import pick_device, prepare_outdir, progress_bar


def add_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--map", nargs="+",
                     help="input map (.mrc), or several (a mixture: one state per map, the same box and "
                          "pixel size); default: the embedded 70S ribosome (64 px, 5 A)")
    src.add_argument("--model", nargs="+",
                     help="atomic model (.pdb/.cif) turned into a potential map with gemmi, or several "
                          "(a mixture; two with --trajectory-states: a motion)")
    parser.add_argument("--shares", default=None, metavar="S1,S2,...",
                        help="each state's share of the particles (default: equal)")
    parser.add_argument("--trajectory-states", type=int, default=None, metavar="K",
                        help="with two --model: K states of the motion from the first to the second")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="pixel size in A (required with --model; overrides the map header)")
    parser.add_argument("--box", type=int, default=None,
                        help="box in px (with --model; with --map, Fourier-crop the map to "
                             "this box)")
    parser.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    parser.add_argument("--snr-db", type=float, default=None,
                        help="SNR in dB (default -10, or the recipe's): see --snr-definition")
    parser.add_argument("--no-noise", action="store_true", help="write noise-free images")
    parser.add_argument("--shift-sigma-a", type=float, default=None,
                        help="standard deviation of the shifts per axis, A (default 0, or the recipe's)")
    parser.add_argument("--defocus-a", type=float, default=15000.0,
                        help="median defocus, A (default 15000)")
    parser.add_argument("--defocus-log-sigma", type=float, default=0.3,
                        help="sigma of log(defocus) (default 0.3)")
    parser.add_argument("--astigmatism-a", type=float, default=300.0,
                        help="typical dU - dV, A (default 300)")
    parser.add_argument("--voltage-kv", type=float, default=300.0)
    parser.add_argument("--cs-mm", type=float, default=2.7)
    parser.add_argument("--amplitude-contrast", type=float, default=0.1)
    parser.add_argument("--bfactor", type=float, default=0.0, help="CTF envelope B-factor, A^2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=512, help="images rendered at once")
    parser.add_argument("--stack-size", type=int, default=100_000, help="images per .mrcs file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    _add_realism_args(parser)
    parser.add_argument("--outdir", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="overwrite a previous simulation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_realism_args(parser: argparse.ArgumentParser) -> None:
    from ..simulate.realism import JUNK_KINDS, RECIPES, SNR_DEFINITIONS
    from ..simulate.views import VIEW_KINDS

    g = parser.add_argument_group("realism layer (any of these, or --recipe, turns it on)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named set of the switches below (docs/simulation.md)")
    g.add_argument("--micrographs", action=argparse.BooleanOptionalAction, default=None,
                   help="group particles into micrographs sharing defocus, astigmatism, B-factor, "
                        "noise level and scale")
    g.add_argument("--particles-per-micrograph", type=float, default=None, help="Poisson mean (default 120)")
    g.add_argument("--junk-fraction", type=float, default=None, help="share of junk picks (default 0)")
    g.add_argument("--junk-mix", default=None, metavar="KIND=SHARE,...",
                   help=f"relative shares of the junk kinds ({', '.join(JUNK_KINDS)}); "
                        "default empty=0.4,partial=0.2,neighbour=0.2,blob=0.2")
    g.add_argument("--views", choices=VIEW_KINDS, default=None, help="view distribution (default uniform)")
    g.add_argument("--cluster-fraction", type=float, default=None,
                   help="cluster: share of particles in the preferred view (default 0.3)")
    g.add_argument("--cluster-kappa", type=float, default=None,
                   help="cluster: von Mises-Fisher concentration (default 10)")
    g.add_argument("--cone-half-angle-deg", type=float, default=None,
                   help="top_cone: half-angle of the cone of views (default 30)")
    g.add_argument("--cone-uniform-fraction", type=float, default=None,
                   help="top_cone: share of uniform views (default 0.5)")
    g.add_argument("--structural-snr", type=float, default=None,
                   help="structural noise before the CTF at the projections' power over this (e.g. 1.4)")
    g.add_argument("--noise-colour", type=float, default=None,
                   help="share of the noise power in a low-pass component (default 0: white)")
    g.add_argument("--shift-tail-fraction", type=float, default=None,
                   help="share of particles shifted uniformly within +-0.2 box (default 0)")
    g.add_argument("--output-box", type=int, default=None,
                   help="render at the map's pixel and Fourier-crop the images to this box")
    g.add_argument("--normalise", action=argparse.BooleanOptionalAction, default=None,
                   help="RELION's normalisation: background mean 0 and sd 1")
    g.add_argument("--float16", action=argparse.BooleanOptionalAction, default=None,
                   help="write float16 stacks (MRC mode 12)")
    g.add_argument("--snr-definition", choices=SNR_DEFINITIONS, default=None,
                   help="what --snr-db sets: whole-box variance ratio (box, the default), mean power "
                        "within the particle's radius over the noise variance (masked), or summed "
                        "power over the noise variance per pixel (integrated)")


#: realism flags -> RealismConfig fields
_REALISM_FLAGS = {"micrographs": "micrographs", "particles_per_micrograph": "particles_per_micrograph",
                  "junk_fraction": "junk_fraction", "views": "views", "cluster_fraction": "cluster_fraction",
                  "cluster_kappa": "cluster_kappa", "cone_half_angle_deg": "cone_half_angle_deg",
                  "cone_uniform_fraction": "cone_uniform_fraction", "structural_snr": "structural_snr",
                  "noise_colour": "noise_colour", "shift_tail_fraction": "shift_tail_fraction",
                  "output_box": "output_box_px", "normalise": "normalise", "float16": "float16",
                  "snr_definition": "snr_definition"}


def parse_junk_mix(text: str) -> dict[str, float]:
    """``"empty=0.4,blob=0.6"`` -> ``{"empty": 0.4, "blob": 0.6}`` (InputError when malformed)."""
    from ..simulate.realism import JUNK_KINDS

    mix: dict[str, float] = {}
    for item in text.split(","):
        name, _, share = item.partition("=")
        name = name.strip()
        try:
            value = float(share)
        except ValueError:
            raise InputError(f"--junk-mix {text!r}: {item!r} is not KIND=SHARE") from None
        if name not in JUNK_KINDS or not np.isfinite(value) or value < 0:
            raise InputError(f"--junk-mix {text!r}: {item!r}: the kinds are {', '.join(JUNK_KINDS)}, "
                             "with shares >= 0")
        mix[name] = value
    return mix


def resolve_simulation(args) -> tuple[dict, object]:
    """The simulation values the recipe and flags set (``snr_db``, ``shift_sigma_a``) and the
    realism layer (a RealismConfig, or None when no recipe or realism flag is given).
    """
    from ..simulate.realism import RECIPES, RealismConfig

    recipe = RECIPES[args.recipe] if args.recipe else {"simulation": {}, "realism": None}
    sim = {"snr_db": -10.0, "shift_sigma_a": 0.0, **recipe["simulation"]}
    for name in ("snr_db", "shift_sigma_a"):
        if getattr(args, name) is not None:
            sim[name] = getattr(args, name)
    flags = {field: getattr(args, flag) for flag, field in _REALISM_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.junk_mix is not None:
        flags["junk_mix"] = parse_junk_mix(args.junk_mix)
    if recipe["realism"] is None and not flags:
        return sim, None
    realism = RealismConfig(**{**(recipe["realism"] or {}), **flags})
    try:
        realism.validate()
    except ValueError as exc:
        raise InputError(f"realism layer: {exc}") from None
    return sim, realism


def load_input_volumes(args) -> tuple[list[np.ndarray], float]:
    """The maps to simulate from (one per state; one for a single structure) and their voxel size
    (A), honouring --map/--model/--box/--trajectory-states.
    """
    from ..simulate import atomic_model_to_map
    from ..simulate.states import trajectory_models

    if args.trajectory_states is not None and (not args.model or len(args.model) != 2):
        raise InputError("--trajectory-states needs two --model (the motion's first and last state)")
    if args.model:
        if args.pixel_size is None or args.box is None:
            raise InputError("--model needs --pixel-size and --box")
        if args.trajectory_states is not None:
            return trajectory_models(*args.model, args.trajectory_states, pixel_size_a=args.pixel_size,
                                     box_px=args.box), args.pixel_size
        return [atomic_model_to_map(m, pixel_size_a=args.pixel_size, box_px=args.box)
                for m in args.model], args.pixel_size
    volumes, sizes = [], []
    for path in args.map or [None]:
        volume, size = load_input_volume(args, path)
        if volumes and (volume.shape != volumes[0].shape or abs(size - sizes[0]) > 1e-3 * sizes[0]):
            raise InputError(f"{path}: {volume.shape[-1]} px at {size:g} A, but {args.map[0]} is "
                             f"{volumes[0].shape[-1]} px at {sizes[0]:g} A: the maps of a mixture must match")
        volumes.append(volume)
        sizes.append(size)
    return volumes, sizes[0]


def load_input_volume(args, path=None) -> tuple[np.ndarray, float]:
    """A map to simulate from and its voxel size (A), honouring --pixel-size and --box (``path``
    None: the embedded map).
    """
    from ..assets import embedded_map_path
    from ..io.mrc import read_volume

    path = path or embedded_map_path()
    volume, voxel_size_a = read_volume(path)
    if args.pixel_size is not None:
        voxel_size_a = args.pixel_size
    if not voxel_size_a or voxel_size_a <= 0:
        raise InputError(f"{path}: the header has no voxel size; give --pixel-size")
    n = volume.shape[-1]
    if volume.shape != (n, n, n):
        raise InputError(f"{path}: the map is {volume.shape}, not a cube")
    if n % 2:
        raise InputError(f"{path}: box size {n} is odd; cryoai needs even boxes")
    if args.box is not None and args.box != n:
        import torch

        from ..physics.fft import fourier_crop_3d

        if args.box > n or args.box % 2:
            raise InputError(f"--box {args.box}: must be even and at most the map's box ({n})")
        cropped = fourier_crop_3d(torch.as_tensor(volume, dtype=torch.float64), args.box)
        volume = cropped.float().numpy()
        voxel_size_a = voxel_size_a * n / args.box
    return volume, voxel_size_a


def check_args(args) -> None:
    """Refuse option values the simulator cannot use (InputError, one line)."""
    for name, value in (("--n", args.n), ("--chunk-size", args.chunk_size),
                        ("--stack-size", args.stack_size)):
        if value < 1:
            raise InputError(f"{name} must be at least 1 (got {value})")
    finite = {"--snr-db": args.snr_db if args.snr_db is not None else -10.0,
              "--shift-sigma-a": args.shift_sigma_a or 0.0,
              "--defocus-a": args.defocus_a, "--defocus-log-sigma": args.defocus_log_sigma,
              "--astigmatism-a": args.astigmatism_a, "--voltage-kv": args.voltage_kv,
              "--cs-mm": args.cs_mm, "--amplitude-contrast": args.amplitude_contrast,
              "--bfactor": args.bfactor}
    for name, value in finite.items():
        if not np.isfinite(value):
            raise InputError(f"{name} must be a finite number (got {value})")
    for name in ("--shift-sigma-a", "--defocus-log-sigma", "--astigmatism-a", "--cs-mm"):
        if finite[name] < 0:
            raise InputError(f"{name} must not be negative (got {finite[name]})")
    for name in ("--defocus-a", "--voltage-kv"):
        if finite[name] <= 0:
            raise InputError(f"{name} must be positive (got {finite[name]})")
    if not 0 <= args.amplitude_contrast < 1:
        raise InputError(f"--amplitude-contrast must be in [0, 1) (got {args.amplitude_contrast})")
    if args.pixel_size is not None and not (np.isfinite(args.pixel_size) and args.pixel_size > 0):
        raise InputError(f"--pixel-size must be a positive number (got {args.pixel_size})")


def main(args) -> int:
    from ..io import write_json_atomic
    from ..simulate import SimulationConfig, simulate_dataset

    check_args(args)
    from ..simulate.states import normalised_shares

    sim, realism = resolve_simulation(args)
    volumes, pixel_size_a = load_input_volumes(args)
    volume = volumes[0]
    shares = None
    if len(volumes) > 1 or args.shares is not None:
        try:
            given = None if args.shares is None else [float(v) for v in args.shares.split(",")]
        except ValueError:
            raise InputError(f"--shares {args.shares}: expected numbers separated by commas") from None
        shares = tuple(float(v) for v in normalised_shares(given, len(volumes)))
    out_box = realism.output_box_px if realism is not None else None
    if out_box is not None and out_box > volume.shape[-1]:
        raise InputError(f"--output-box {out_box}: larger than the map's box ({volume.shape[-1]})")
    if not args.no_noise and any(float(np.ptp(v)) == 0.0 for v in volumes):
        raise InputError(f"{' '.join(args.map or args.model or ['map'])}: a map is constant, so its "
                         "projections have no signal to set an SNR against (use --no-noise)")
    outdir = prepare_outdir(args.outdir, marker="particles.star", force=args.force,
                            resumable=False)
    cfg = SimulationConfig(
        n_particles=args.n, seed=args.seed, snr_db=None if args.no_noise else sim["snr_db"],
        shift_sigma_a=sim["shift_sigma_a"], defocus_median_a=args.defocus_a,
        defocus_log_sigma=args.defocus_log_sigma, astigmatism_sigma_a=args.astigmatism_a,
        voltage_kv=args.voltage_kv, cs_mm=args.cs_mm, amplitude_contrast=args.amplitude_contrast,
        bfactor_a2=args.bfactor, chunk_size=args.chunk_size, stack_size=args.stack_size,
        realism=realism, state_shares=shares if len(volumes) > 1 else None,
    )
    bar = progress_bar(args.n, "simulate", disable=args.quiet)
    try:
        report = simulate_dataset(volumes if len(volumes) > 1 else volume, pixel_size_a, outdir, cfg,
                                  device=pick_device(args.device), progress=bar.update)
    finally:
        bar.close()
    report.setdefault("box_px", int(volume.shape[-1]))
    report.setdefault("pixel_size_a", pixel_size_a)
    report.update({"config": cfg.to_dict(), "recipe": args.recipe,
                   "source": args.model or args.map or "embedded 70S ribosome",
                   **({"trajectory_states": args.trajectory_states} if args.trajectory_states else {})})
    write_json_atomic(Path(outdir) / "simulation.json", report)
    snr = "no noise" if cfg.snr_db is None else f"SNR {report['snr_db_measured']:.2f} dB measured"
    print(f"wrote {args.n} particles ({report['box_px']} px, {report['pixel_size_a']:.3f} A, {snr}) "
          f"to {report['star_path']}")
    if len(volumes) > 1:
        print(f"states: {len(volumes)} maps, particles per state {report['state_counts']}; each particle's "
              f"state in {Path(outdir) / 'truth.csv'}")
    if realism is not None:
        junk = sum(report["junk"].values())
        kinds = ", ".join(f"{k} {v}" for k, v in report["junk"].items() if v)
        print(f"realism: {report['micrographs']} micrographs, {junk} junk ({kinds or 'none'}), "
              f"views SCF {report['views_scf']:.2f}; SNR {report['snr_db_box']:.2f} dB (box), "
              f"{report['snr_db_masked']:.2f} dB (masked), ISNR {report['isnr']:.0f}; "
              f"truth in {Path(outdir) / 'truth.csv'}")
    return 0
