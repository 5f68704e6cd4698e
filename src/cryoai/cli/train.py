"""A 3D map and every particle's pose from a particle set, ab initio (or with --poses held fixed).

Runs the default pipeline (docs/pipeline.md): noise model, pose search, view balancing, pose
encoder, assignment, reconstruction, junk calls, 3D classes, decoder polish. Writes to OUTDIR:
volume.mrc and its half maps, poses.star (RELION) and poses.cs (cryoSPARC), outputs.json,
train_log.jsonl, config.yaml (the resolved options) and checkpoint.pt (for --resume and
cryoai predict-poses).

Options come from the defaults, then --preset, then --config YAML, then individual flags.

Example: cryoai train Select/job020/particles.star --outdir run/ --particle-diameter-a 250
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..training.config import PRESETS, add_config_args, resolve_config
from .common import pick_device, prepare_outdir


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.usage = "cryoai train PARTICLES --outdir RUN [options]"
    parser.add_argument("particles", help="The particles: a RELION .star or cryoSPARC .cs file.")
    run = parser.add_argument_group("input and run")
    run.add_argument("--outdir", required=True, help="The run directory (created; see --force, --resume).")
    run.add_argument("--datadir", default=None, help="A folder to look for the image stacks in.")
    run.add_argument("--poses", default=None,
                     help="A STAR/.cs file with poses to hold fixed: reconstruction with known poses.")
    run.add_argument("--preset", default=None, choices=sorted(PRESETS),
                     help="A named configuration: paper is the ECCV 2022 cryoAI (pure amortized training).")
    run.add_argument("--config", default=None, help="A YAML file of options (flags override it).")
    run.add_argument("--ground-truth", default=None,
                     help="A map to log the FSC against during the fit (evaluation only).")
    run.add_argument("--device", default=None, help="The torch device (default: cuda if present, else cpu).")
    run.add_argument("--resume", action="store_true", help="Continue the run in OUTDIR from its checkpoint.")
    run.add_argument("--force", action="store_true", help="Overwrite a previous run in OUTDIR.")
    run.add_argument("--quiet", action="store_true", help="No progress bars or log lines.")
    add_config_args(parser)


def main(args) -> int:
    from pathlib import Path

    from ..io import load_particles
    from ..pipeline import check_inputs, run_default
    from ..training.config import TrainConfig, load_yaml
    from ..training.distributed import barrier, init_distributed, shutdown

    if args.resume:
        saved = Path(args.outdir) / "config.yaml"
        if not (Path(args.outdir) / "checkpoint.pt").exists():
            raise InputError(f"{args.outdir}: no checkpoint.pt to resume from")
        base = TrainConfig.from_dict(load_yaml(saved), source=str(saved)) if saved.exists() else None
        cfg = resolve_config(args) if base is None else _override(base, args)
    else:
        cfg = resolve_config(args)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    table = load_particles(args.particles, datadir=args.datadir, read_poses=False)  # not used
    fixed = load_particles(args.poses, datadir=args.datadir) if args.poses else None
    # Under torchrun: join the process group; each rank trains on its shard of every batch.
    dist_info, device = init_distributed(pick_device(args.device))
    try:
        # Every input is checked before the output directory is touched.
        scale = check_inputs(table, cfg, fixed)
        truth = _read_ground_truth(args.ground_truth, table.box_px) if args.ground_truth else None
        outdir = _prepare_outdir_once(args, dist_info, device)
        on_volume = _fsc_logger(truth, aligned=fixed is not None) if truth is not None else None
        result = run_default(table, cfg, outdir, device=device, fixed_poses=fixed, resume=args.resume,
                             quiet=args.quiet, argv=sys.argv, dist_info=dist_info, scale=scale,
                             on_volume=on_volume)
        outputs = result.outputs
        # Rank 0 writes the final outputs after the last step; the others wait for it rather
        # than tearing the process group down under it.
        barrier(dist_info)
    finally:
        shutdown()
    if not dist_info.is_main:
        return 0
    if args.quiet:  # (else the run's summary said it)
        print(f"map:   {outputs['volume']}")
        if "poses" in outputs:
            print(f"poses: {outputs['poses']}")
    for warning in outputs.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _prepare_outdir_once(args, dist_info, device):
    """Rank 0 checks and creates the output directory; the other ranks wait for its verdict
    (each checking on its own would race with rank 0's first writes).
    """
    from pathlib import Path

    from ..errors import CryoaiError, OutputError
    from ..training.distributed import all_true

    error = None
    if dist_info.is_main:
        try:
            prepare_outdir(args.outdir, marker="config.yaml", force=args.force, resume=args.resume)
        except CryoaiError as exc:
            error = exc
    ok = all_true(error is None, dist_info, device)
    if error is not None:
        raise error
    if not ok:
        raise OutputError(f"{args.outdir}: rank 0 could not prepare the output directory")
    return Path(args.outdir)


def _override(base, args):
    from dataclasses import fields, replace

    from ..training.config import policy_overrides

    changes = {}
    for f in fields(base):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            changes[f.name] = v
    flags = policy_overrides(args)
    if flags:
        changes["policy"] = replace(base.policy, **flags)
    cfg = replace(base, **changes)
    cfg.validate()
    return cfg


def _read_ground_truth(path, box: int):
    """The reference map of ``--ground-truth``, checked against the particles' box."""
    from ..io.mrc import read_volume

    truth, _ = read_volume(path)
    if truth.shape[-1] != box:
        raise InputError(f"{path}: box {truth.shape[-1]} differs from the particles' {box}")
    return truth


def _fsc_logger(truth, aligned: bool):
    """A callback that logs the FSC of the current map against a reference map. ``aligned``:
    whether the map is in the reference's frame (poses given with --poses); ab initio maps are
    in an arbitrary frame, so their logged FSC is only a rough guide (use cryoai evaluate with
    the true poses for the final figure).
    """
    from ..evaluation.metrics import best_flip_fsc
    from ..training.run_dir import FSC_LOG

    def log(tr):
        rep = best_flip_fsc(tr.volume(), truth, tr.pixel_size_a)
        rec = {"step": tr.state.step, "minutes": tr.state.minutes,
               "fsc_0.5_px": rep["resolution_px_0.5"], "fsc_0.143_px": rep["resolution_px_0.143"],
               "aligned_to_reference": aligned}
        tr.run_dir.log(rec, FSC_LOG)
        tr.run_dir.scalar("fsc/resolution_px_0.5", rec["fsc_0.5_px"], tr.state.step)

    return log
