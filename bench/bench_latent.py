"""cryoai's latent model beside cryoDRGN's train_vae on the same images and poses.

On a simulated set with a state per particle (``cryoai simulate --model A B --trajectory-states
K``, or several maps), both run at the true poses:

- cryoai: ``cryoai train PARTICLES --poses PARTICLES --latent-dim D`` (the latent stage's own
  time is what is compared; the run's other stages are a reconstruction at the given poses);
- cryoDRGN 4.3.1 (CPU, its own virtual environment: ``--drgn``): ``parse_pose_star``,
  ``parse_ctf_star``, then ``train_vae --zdim D`` with a checkpoint every epoch for
  ``--drgn-minutes``; the last epoch done within cryoai's time and the last epoch of all are
  evaluated.

Both are scored by CryoBench's per-image FSC-AUC (``cryoai.evaluation.metrics.fsc_auc``): the
same particles (``--images``, spread evenly over the set), each one's map at its latent vector
against its true state's map. cryoDRGN's maps come out in its own frame (axes order and
origin): the one of the 48 signed axis permutations and the sub-voxel translation that best
fit its mean map to the middle state's are applied to all its maps.

Example: python bench/bench_latent.py /tmp/lat/motion --dim 2 --outdir /tmp/lat/bench \\
             --drgn /work/venv-drgn/bin/cryodrgn --drgn-minutes 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryoai.evaluation.metrics import _phase_shift_volume, fsc_auc, register_translation
from cryoai.io.mrc import read_volume
from cryoai.reconstruction.latent import read_latent


def sample_rows(truth: pd.DataFrame, n: int) -> np.ndarray:
    real = (truth["kind"] == "particle").to_numpy() if "kind" in truth else np.ones(len(truth), bool)
    eligible = np.flatnonzero(real)
    return eligible[np.linspace(0, len(eligible) - 1, min(n, len(eligible))).round().astype(int)]


def run_cryoai(sim: Path, out: Path, dim: int, reuse: bool) -> dict:
    t0 = time.perf_counter()
    if not (reuse and (out / "latent.npz").exists()):
        star = str(sim / "particles.star")
        command = ["train", star, "--poses", star, "--latent-dim", str(dim), "--max-epochs", "0.05",
                   "--outdir", str(out), "--quiet"]
        subprocess.run([sys.executable, "-m", "cryoai.cli.main", *command], check=True)
    wall = time.perf_counter() - t0
    latent = next(json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
                  if '"stage": "latent"' in line)
    return {"wall_s": wall, "latent_s": latent["seconds"], "determined": latent["determined"]}


def cryoai_maps(out: Path, rows: np.ndarray):
    model, background, _ = read_latent(out / "latent.npz")
    for row in rows:
        yield model.volume(model.z[row], background)


def run_cryodrgn(drgn: str, sim: Path, out: Path, dim: int, minutes: float, box: int, apix: float,
                 extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    star = str(sim / "particles.star")
    image = ["-D", str(box), "--Apix", str(apix)]
    subprocess.run([drgn, "parse_pose_star", star, "-o", str(out / "pose.pkl"), *image], check=True,
                   capture_output=True)
    subprocess.run([drgn, "parse_ctf_star", star, "-o", str(out / "ctf.pkl"), *image], check=True,
                   capture_output=True)
    train = out / "train"
    cmd = [drgn, "train_vae", star, "--datadir", str(sim), "--poses", str(out / "pose.pkl"), "--ctf",
           str(out / "ctf.pkl"), "--zdim", str(dim), "-n", "1000", "-o", str(train), "--checkpoint", "1",
           "--uninvert-data", "--no-analysis", "--max-threads", "2", "--num-workers", "0", *extra]
    t0 = time.perf_counter()
    finished = {}  # epoch -> seconds since the start when its z file appeared
    with open(out / "train_vae.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.perf_counter() - t0 < minutes * 60:
                time.sleep(2)
                for path in train.glob("z.*.pkl"):
                    epoch = int(path.stem.split(".")[1])
                    finished.setdefault(epoch, time.perf_counter() - t0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    for path in train.glob("z.*.pkl"):
        finished.setdefault(int(path.stem.split(".")[1]), time.perf_counter() - t0)
    return {"epochs": {int(k): v for k, v in sorted(finished.items())}}


def cryodrgn_maps(drgn: str, out: Path, epoch: int, rows: np.ndarray, tag: str) -> list[np.ndarray]:
    train = out / "train"
    with open(train / f"z.{epoch}.pkl", "rb") as f:
        z = np.asarray(pickle.load(f))
    zfile = out / f"z_{tag}.txt"
    np.savetxt(zfile, np.atleast_2d(z[rows]).reshape(len(rows), -1))
    vols = out / f"vols_{tag}"
    subprocess.run([drgn, "eval_vol", str(train / f"weights.{epoch}.pkl"), "-c", str(train / "config.yaml"),
                    "--zfile", str(zfile), "-o", str(vols)], check=True, capture_output=True)
    files = sorted(vols.glob("*.mrc"))
    return [read_volume(p)[0] for p in files]


def frame_fit(volume: np.ndarray, reference: np.ndarray):
    """The signed axis permutation and translation that best fit ``volume`` to ``reference``."""
    best = None
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            v = np.transpose(volume, perm)
            for axis, f in enumerate(flips):
                if f:
                    v = np.roll(np.flip(v, axis), 1, axis=axis)
            moved, shift = register_translation(v, reference)
            score = fsc_auc(moved, reference)
            if best is None or score > best[0]:
                best = (score, perm, flips, shift)
    return best[1:]


def apply_frame(volume: np.ndarray, frame) -> np.ndarray:
    perm, flips, shift = frame
    v = np.transpose(volume, perm)
    for axis, f in enumerate(flips):
        if f:
            v = np.roll(np.flip(v, axis), 1, axis=axis)
    return np.fft.ifftn(_phase_shift_volume(np.fft.fftn(v), shift)).real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sim", type=Path, help="a cryoai simulate folder with truth.csv and state maps")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--drgn", default=None,
                        help="the cryodrgn command (its own environment); none: cryoai only")
    parser.add_argument("--drgn-minutes", type=float, default=10.0)
    parser.add_argument("--drgn-args", default="--enc-dim 256 --dec-dim 256",
                        help="train_vae's architecture (its 1024-wide default does not finish an epoch of "
                             "10,000 64 px images in 15 minutes on 2 cores)")
    parser.add_argument("--reuse", action="store_true", help="keep an existing cryoai run in OUTDIR/cryoai")
    args = parser.parse_args()
    truth = pd.read_csv(args.sim / "truth.csv")
    states = truth["state"].to_numpy()
    maps = [read_volume(p)[0] for p in sorted(args.sim.glob("ground_truth_state_*.mrc"))]
    _, apix = read_volume(sorted(args.sim.glob("ground_truth_state_*.mrc"))[0])
    box = maps[0].shape[-1]
    rows = sample_rows(truth, args.images)
    results = {"images": int(len(rows)), "dim": args.dim, "particles": int(len(truth))}

    def auc(volumes) -> float:
        return float(np.mean([fsc_auc(v, maps[states[r] - 1]) for v, r in zip(volumes, rows, strict=True)]))

    ours = run_cryoai(args.sim, args.outdir / "cryoai", args.dim, args.reuse)
    ours["fsc_auc"] = auc(cryoai_maps(args.outdir / "cryoai", rows))
    results["cryoai"] = ours
    print(f"cryoai: latent model {ours['latent_s']:.0f} s (this call {ours['wall_s']:.0f} s), "
          f"per-image FSC-AUC {ours['fsc_auc']:.4f}", flush=True)
    if args.drgn:
        drgn_out = args.outdir / "cryodrgn"
        theirs = run_cryodrgn(args.drgn, args.sim, drgn_out, args.dim, args.drgn_minutes, box, apix,
                              args.drgn_args.split())
        theirs["args"] = args.drgn_args
        epochs = theirs["epochs"]
        if not epochs:
            raise SystemExit("cryoDRGN finished no epoch in the time given")
        within = [e for e, s in epochs.items() if s <= ours["latent_s"]]
        picks = {"last": max(epochs)}
        if within:
            picks["same_time"] = max(within)
        mean_z_epoch = picks["last"]
        # cryoDRGN's frame: fitted once, on its last epoch's map of the middle particle, to its state's map
        middle = rows[len(rows) // 2]
        sample = cryodrgn_maps(args.drgn, drgn_out, mean_z_epoch, np.array([middle]), "frame")[0]
        frame = frame_fit(sample, maps[states[middle] - 1])
        for tag, epoch in picks.items():
            volumes = [apply_frame(v, frame) for v in cryodrgn_maps(args.drgn, drgn_out, epoch, rows, tag)]
            theirs[tag] = {"epoch": epoch, "seconds": epochs[epoch], "fsc_auc": auc(volumes)}
            print(f"cryoDRGN ({tag}): epoch {epoch} at {epochs[epoch]:.0f} s, per-image FSC-AUC "
                  f"{theirs[tag]['fsc_auc']:.4f}", flush=True)
        results["cryodrgn"] = theirs
        for tag in picks:
            print(f"ratio cryoai / cryoDRGN ({tag}): {ours['fsc_auc'] / theirs[tag]['fsc_auc']:.3f} in "
                  f"{ours['latent_s'] / theirs[tag]['seconds']:.2f}x its time")
    (args.outdir / "bench_latent.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
