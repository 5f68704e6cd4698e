"""Ways to pose particles against a run's map, compared on the same particles in one run.

Loads a run's checkpoint (map, pose encoder, its calibrated confidence threshold) and a particle
set with true poses that the run never saw, then poses the first ``--n`` particles with each
variant, one after the other, end to end from disk (reading, whitening, first guess,
refinement; the noise spectra are measured once before), and prints per variant: images per
second, how many particles the encoder posed, and the median rotation error against the truth
after one global alignment (the first variant's, applied to all). The first variant is the
global assignment of the default before the encoder stage (exhaustive search, then 8 rounds of
48 random local candidates): every ratio is against it.

Example (the issue's ratio; the checkpoint and particles of ``bench/bench_amortized.py``):
  python bench/bench_assignment.py /tmp/bench-amortized/run_50000/checkpoint.pt \\
      /tmp/bench-amortized/new_-10dB/particles.star --n 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from cryoai.cli.common import pick_device
from cryoai.cli.predict_poses import load_model
from cryoai.data.dataset import ParticleDataset
from cryoai.data.noise import measure_noise
from cryoai.evaluation.metrics import MIRROR, align_rotations
from cryoai.io import load_particles
from cryoai.models.decoders import decoder_to_volume
from cryoai.physics.fft import fft3_c
from cryoai.physics.masks import map_mask_radius_px
from cryoai.physics.rotations import geodesic_distance
from cryoai.pipeline.decisions import encoder_min_confidence
from cryoai.pipeline.settings import assignment_settings
from cryoai.reconstruction import ParticleSpectra, PoseAssigner, assign_poses
from cryoai.training.checkpoint import load_pose_encoder

OLD = {"prune_keep": 0, "refine_method": "random", "refine_rounds": 8, "refine_candidates": 48,
       "refine_radius_frac": 0.7}

#: (label, uses the encoder, no fallback, settings changed from the run's).
VARIANTS = [
    ("global exhaustive + 8 x 48 random (the default before the encoder stage)", False, False, OLD),
    ("global exhaustive + Newton", False, False, {"prune_keep": 0}),
    ("global pruned + Newton (where it does not)", False, False, {}),
    ("encoder + exhaustive fallback + Newton (the earlier default)", True, False, {"prune_keep": 0}),
    ("encoder + pruned fallback + Newton (where the run's check passes)", True, False, {}),
    ("encoder + pruned fallback + Newton, 3 rounds", True, False, {"refine_rounds": 3}),
    ("encoder alone + Newton", True, True, {}),
    ("encoder alone, no refinement", True, True, {"refine_rounds": 0}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("particles", help="STAR with true poses (never seen by the run)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--only", type=int, nargs="*", default=None, help="indices of VARIANTS to run")
    args = p.parse_args()
    device = pick_device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device)
    table = load_particles(args.particles, read_poses=True)
    n = min(args.n, len(table))
    true_rot = torch.as_tensor(table.rotations[:n], dtype=torch.float64)
    dataset = ParticleDataset(table.subset(np.arange(n)),
                              invert_contrast=cfg.invert_contrast, scale=float(ckpt["scale"]))
    dataset.noise = measure_noise(dataset, ckpt["config"].get("noise_model", "white"),
                                  map_mask_radius_px(table.box_px, cfg.mask_radius_frac), seed=cfg.seed)
    box = model.box_px
    volume = fft3_c(decoder_to_volume(model.decoder, box)) / box
    payload = ckpt.get("pose_encoder")
    encoder = load_pose_encoder(payload, device)
    min_conf = encoder_min_confidence((payload or {}).get("check"), cfg.pose_encoder)
    base = assignment_settings(cfg, box)
    particles = ParticleSpectra(dataset, model.formation, device)
    frame = None
    rows = []
    for i, (label, use_encoder, alone, change) in enumerate(VARIANTS):
        if args.only is not None and i not in args.only and i != 0:
            continue
        if use_encoder and encoder is None:
            continue
        settings = dataclasses.replace(base, **change)
        t0 = time.perf_counter()
        assigner = PoseAssigner(model.formation, volume, settings, encoder if use_encoder else None,
                                min_confidence=0.0 if alone else min_conf)
        rotations = np.concatenate([rot for rot, _ in assign_poses(particles, assigner, block=1024)])[:n]
        seconds = time.perf_counter() - t0
        if frame is None:  # the first variant's global alignment, for every variant
            frame = align_rotations(rotations, true_rot.numpy())
        truth = MIRROR @ true_rot @ MIRROR if frame["mirror"] else true_rot
        angle = torch.rad2deg(geodesic_distance(torch.as_tensor(rotations, dtype=torch.float64),
                                                torch.as_tensor(frame["A"]) @ truth)).numpy()
        row = {"variant": label, "particles": n, "images_per_s": round(n / seconds, 1),
               "by_encoder": assigner.counts["amortized"], "by_global": assigner.counts["global"],
               "median_error_deg": round(float(np.median(angle)), 3),
               "within_10_deg": round(float(np.mean(angle <= 10)), 4)}
        if rows:
            row["speed_vs_first"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
