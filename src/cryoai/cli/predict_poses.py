"""Give every particle a pose from a trained cryoai run (batched, streamed, none dropped).

A default run (or a ``--poses`` run) poses them against its map as it posed the particles
outside its search's subset: the first guess from its pose encoder's hypotheses (each scored
against the map over the shift grid), or from the global search of the SO(3) grid x the shift
grid where the run's check found the encoder not accurate enough (``--first-guess`` overrides
the run's choice), then local refinement rounds. The map stays fixed, so the poses are in its
frame (the run's map plus these poses reconstruct) and every particle costs the same. A run of
the paper's amortized training (``--ab-initio encoder``, ``--preset paper``) predicts the poses
with its own encoder. Writes a RELION 3.1 STAR with every input column kept and rlnAngleRot/Tilt/Psi
(degrees) and rlnOriginXAngst/YAngst, or a cryoSPARC .cs. The stacks keep the names they had in the
input (run from the RELION or cryoSPARC project folder, the output imports from there too).

Example: cryoai predict-poses run/checkpoint.pt particles.star --out poses.star
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..io import IMAGE_PATHS
from .common import pick_device, progress_bar


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt written by cryoai train")
    parser.add_argument("particles", help=".star or .cs particle file (same box and pixel size)")
    parser.add_argument("--out", required=True,
                        help="output particle file: .star (RELION) or .cs (cryoSPARC); its folder is made "
                             "if needed")
    parser.add_argument("--datadir", default=None,
                        help="folder to look for image stacks in, after the current folder (the project "
                             "folder, to which RELION and cryoSPARC write stack names) and the particle "
                             "file's folder")
    parser.add_argument("--image-paths", choices=IMAGE_PATHS, default="as_read",
                        help="how the output names the image stacks: as_read keeps the input's names "
                             "(relative to the project folder, as RELION and cryoSPARC write them) where "
                             "they lead to the same stacks from the output, else relative to the output's "
                             "folder; relative: all relative to the output's folder; absolute: absolute "
                             "paths (default: as_read)")
    parser.add_argument("--first-guess", choices=("auto", "encoder", "global"), default="auto",
                        help="first guess before the local refinement: the run's pose encoder (for every "
                             "particle), the global search, or what the run's check chose (default: the "
                             "encoder where it is sure enough, if the check passed)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument("--quiet", action="store_true")


def load_model(checkpoint_path, device):
    """The CryoAI model, config and checkpoint payload of a checkpoint file."""
    from ..models.cryoai import build_model
    from ..training.checkpoint import load_checkpoint
    from ..training.config import TrainConfig

    ckpt = load_checkpoint(checkpoint_path, map_location=device)
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(checkpoint_path))
    model = build_model(cfg, int(ckpt["box_px"]), float(ckpt["pixel_size_a"]),
                        with_encoder=not ckpt.get("fixed_poses", False), device=device)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def main(args) -> int:
    from pathlib import Path

    from ..data.dataset import ParticleDataset
    from ..data.loader import make_loader
    from ..data.noise import measure_noise
    from ..errors import OutputError
    from ..io import load_particles
    from ..physics.masks import circular_mask, map_mask_radius_px
    from ..training.poses import iter_poses

    if Path(args.out).exists() and not args.force:
        raise OutputError(f"{args.out}: exists; use --force to overwrite")
    device = pick_device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device)
    table = load_particles(args.particles, datadir=args.datadir, read_poses=False)
    if table.box_px != model.box_px:
        raise InputError(f"{args.particles}: box {table.box_px} differs from the model's {model.box_px}")
    dataset = ParticleDataset(table, invert_contrast=cfg.invert_contrast, scale=float(ckpt["scale"]))
    dataset.source.validate()
    # The new particles whitened as the run's were, by their own noise spectra (checkpoints of
    # runs before the noise model read white noise).
    noise_kind = ckpt["config"].get("noise_model", "white")
    working = ckpt.get("working_box") if model.encoder is None else None
    if working:  # posed as the run posed its particles: on the images cropped to its working box
        from ..data.cropped import cropped_dataset

        dataset = cropped_dataset(dataset, int(working["box_px"]), scale=float(working["scale"]))
    # (measured once, at the box the particles are posed at)
    dataset.noise = measure_noise(dataset, noise_kind, map_mask_radius_px(dataset.table.box_px,
                                                                          cfg.mask_radius_frac),
                                  seed=cfg.seed)
    if model.encoder is None:
        assigner = _assigner(model, cfg, ckpt, device, args.first_guess, args.checkpoint)
        poses = _assign_against_map(assigner, dataset, device, len(table), args.quiet)
        _write(args.out, table, poses, args.image_paths, cfg.invert_contrast)
        counts = assigner.counts
        print(f"wrote poses of {len(table)} particles to {args.out} (posed against the run's map: first "
              f"guess from the pose encoder for {counts['amortized']}, the global search for "
              f"{counts['global']}; then refined)")
        return 0
    mask = None
    if cfg.mask_radius_frac > 0:
        mask = circular_mask(model.box_px, cfg.mask_radius_frac * model.box_px, soft_edge_px=3, device=device)
    loader = make_loader(dataset, args.batch_size, shuffle=False, seed=0, num_workers=args.num_workers)
    bar = progress_bar(len(table), "predict", disable=args.quiet)
    poses = iter_poses(model, loader, mask, device, use_symmetric=cfg.loss == "symmetric",
                       learn_shifts=cfg.learn_shifts, progress=bar.update)
    try:  # streamed: the poses are written as they are predicted
        _write(args.out, table, ((rot, shifts) for rot, shifts, _ in poses), args.image_paths,
               cfg.invert_contrast)
    finally:
        bar.close()
    print(f"wrote poses of {len(table)} particles to {args.out}")
    return 0


def _assigner(model, cfg, ckpt, device, first_guess: str, checkpoint_path):
    """The run's map with its first guess (encoder or global) and refinement."""
    from ..models.decoders import decoder_to_volume
    from ..physics.fft import fft3_c
    from ..pipeline.decisions import encoder_min_confidence
    from ..pipeline.settings import assignment_settings
    from ..reconstruction import PoseAssigner
    from ..training.checkpoint import load_pose_encoder

    n = model.box_px
    fourier_volume = fft3_c(decoder_to_volume(model.decoder, n)) / n  # the decoders' 1/N scale
    formation = model.formation
    working = ckpt.get("working_box")
    if working:  # the run's map at the box the run posed its particles at
        from ..data.cropped import cropped_fourier_volume
        from ..models.image_formation import ImageFormation

        n = int(working["box_px"])
        ratio = float(ckpt["scale"]) / float(working["scale"])  # full box scale / cropped images scale
        fourier_volume = cropped_fourier_volume(fourier_volume, n, ratio)
        pixel_size_a = model.formation.pixel_size_a * model.box_px / n
        formation = ImageFormation(n, pixel_size_a).to(fourier_volume.device)
    payload = ckpt.get("pose_encoder")
    encoder = load_pose_encoder(payload, device)
    if first_guess == "encoder" and encoder is None:
        raise InputError(f"{checkpoint_path}: --first-guess encoder: this run trained no pose encoder")
    use = encoder is not None and (first_guess == "encoder" or
                                   (first_guess == "auto" and bool((payload.get("check") or {}).get("used"))))
    check = (payload or {}).get("check")
    return PoseAssigner(formation, fourier_volume, assignment_settings(cfg, n),
                        encoder if use else None,
                        min_confidence=(0.0 if first_guess == "encoder" else
                                        encoder_min_confidence(check, cfg.pose_encoder)))


def _assign_against_map(assigner, dataset, device, n_particles: int, quiet: bool):
    """(rotations, shifts_a) blocks of every particle, posed against the run's map."""
    from ..reconstruction import ParticleSpectra, assign_poses

    particles = ParticleSpectra(dataset, assigner.formation, device)
    bar = progress_bar(n_particles, "assign", disable=quiet)
    try:
        for rotations, shifts_a in assign_poses(particles, assigner, block=1024):
            bar.update(len(rotations))
            yield rotations, shifts_a
    finally:
        bar.close()


def _write(path, table, poses, image_paths: str, invert_contrast: bool) -> None:
    """Write the poses as RELION STAR or cryoSPARC .cs, by the extension of ``path``; the stacks
    named as ``image_paths`` says. ``invert_contrast``: the run's (after its own check of the
    map's sign), i.e. whether the protein is dark in the stacks (cryoSPARC's ``blob/sign`` -1).
    """
    import contextlib
    from pathlib import Path

    from ..io import write_cs, write_star

    out = Path(path)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)  # e.g. a RELION External/jobNNN/ folder
    try:
        if out.suffix.lower() == ".cs":
            write_cs(out, table, poses=poses, image_paths=image_paths, sign=-1 if invert_contrast else 1)
        else:
            write_star(out, table, poses=poses, image_paths=image_paths)
    except BaseException:
        for d in created:  # leave no empty folders behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
