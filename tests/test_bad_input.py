"""A corpus of bad inputs, generated here, each run through the command line in-process.

Every case must give a non-zero exit, exactly one line on stderr that names the offending file
and the problem, no traceback, and leave every file under the case's folder as it was (the
output directory is not even created when it did not exist). The corpus covers the particle
metadata (STAR and .cs), the image stacks, the maps, the checkpoints, the options and the
output directory.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from _cli_util import run_fails, write_map
from cryoai.cli.main import main

N_PARTICLES = 12
BOX = 32


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> Path:
    """A valid simulated set (12 particles, 32 px) and a trained checkpoint; read only."""
    root = tmp_path_factory.mktemp("good")
    sim = root / "sim"
    assert main(["simulate", "--box", str(BOX), "--n", str(N_PARTICLES), "--seed", "4",
                 "--snr-db", "0", "--device", "cpu", "--quiet", "--outdir", str(sim)]) == 0
    run = root / "run"
    assert main(["train", str(sim / "particles.star"), "--outdir", str(run), "--ab-initio", "encoder",
                 "--max-epochs", "1", "--batch-size", "4", "--encoder-width", "0.125",
                 "--device", "cpu", "--quiet", "--no-tensorboard"]) == 0
    return root


def _star(case: Path) -> dict[str, pd.DataFrame]:
    return starfile.read(case / "sim" / "particles.star", always_dict=True)


def _write_star(case: Path, blocks: dict[str, pd.DataFrame], name: str = "particles.star") -> Path:
    path = case / "sim" / name
    starfile.write(blocks, path, overwrite=True)
    return path


def _stack(case: Path) -> Path:
    return case / "sim" / "particles_000.mrcs"


def _set_stack_pixels(case: Path, fn: Callable[[np.ndarray], None]) -> None:
    # The corpus writes NaN and infinite pixels on purpose: mrcfile's header statistics warn.
    with mrcfile.open(_stack(case), mode="r+", permissive=True) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        data = np.array(m.data)
        fn(data)
        m.set_data(data)


def _train(case: Path, particles: Path | None = None, *extra: str) -> list[str]:
    particles = particles if particles is not None else case / "sim" / "particles.star"
    return ["train", str(particles), "--outdir", str(case / "out"), "--max-epochs", "1",
            "--device", "cpu", "--quiet", "--no-tensorboard", *extra]


# Each case: (id, builder(case_dir) -> (argv, strings the message must contain)).
def c_missing_particles(case):
    return _train(case, case / "nope.star"), ["nope.star", "not found"]


def c_empty_star(case):
    p = case / "sim" / "empty.star"
    p.write_text("")
    return _train(case, p), ["empty.star"]


def c_not_a_star(case):
    p = case / "sim" / "garbage.star"
    p.write_bytes(b"\x00\x01this is not a STAR file\xff" * 20)
    return _train(case, p), ["garbage.star"]


def c_no_particle_table(case):
    blocks = _star(case)
    p = _write_star(case, {"optics": blocks["optics"]}, "optics_only.star")
    return _train(case, p), ["optics_only.star", "particle"]


def c_no_image_names(case):
    blocks = _star(case)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnImageName"])
    p = _write_star(case, blocks, "no_names.star")
    return _train(case, p), ["no_names.star", "rlnImageName"]


def c_no_ctf(case):
    blocks = _star(case)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV"])
    p = _write_star(case, blocks, "no_ctf.star")
    return _train(case, p), ["no_ctf.star", "rlnDefocusU"]


def c_no_pixel_size(case):
    blocks = _star(case)
    blocks["optics"] = blocks["optics"].drop(columns=["rlnImagePixelSize"])
    p = _write_star(case, blocks, "no_apix.star")
    return _train(case, p), ["no_apix.star", "pixel size"]


def c_zero_pixel_size(case):
    blocks = _star(case)
    blocks["optics"]["rlnImagePixelSize"] = 0.0
    p = _write_star(case, blocks, "zero_apix.star")
    return _train(case, p), ["zero_apix.star", "pixel size"]


def c_phase_flipped_optics(case):
    blocks = _star(case)
    blocks["optics"]["rlnCtfDataArePhaseFlipped"] = 1
    p = _write_star(case, blocks, "flipped.star")
    return _train(case, p), ["flipped.star", "phase-flipped", "rlnCtfDataArePhaseFlipped"]


def c_ctf_premultiplied_particles(case):
    blocks = _star(case)
    blocks["particles"]["rlnCtfDataAreCtfPremultiplied"] = 0
    blocks["particles"].loc[5, "rlnCtfDataAreCtfPremultiplied"] = 1  # one particle is enough
    p = _write_star(case, blocks, "premultiplied.star")
    return _train(case, p), ["premultiplied.star", "rlnCtfDataAreCtfPremultiplied"]


def c_nan_defocus(case):
    blocks = _star(case)
    blocks["particles"].loc[3, "rlnDefocusU"] = np.nan
    p = _write_star(case, blocks, "nan_defocus.star")
    return _train(case, p), ["nan_defocus.star", "rlnDefocusU"]


def c_missing_stack(case):
    _stack(case).unlink()
    return _train(case), ["particles_000.mrcs", "not found"]


def c_truncated_stack(case):
    data = _stack(case).read_bytes()
    _stack(case).write_bytes(data[: len(data) // 2])
    return _train(case), ["particles_000.mrcs", "truncated"]


def c_not_mrc_stack(case):
    _stack(case).write_bytes(np.random.default_rng(0).bytes(4096))
    return _train(case), ["particles_000.mrcs", "MRC"]


def c_unsupported_mode(case):
    # MRC mode 3 (complex int16): a valid header word that no particle stack uses.
    raw = bytearray(_stack(case).read_bytes())
    raw[12:16] = struct.pack("<i", 3)
    _stack(case).write_bytes(bytes(raw))
    return _train(case), ["particles_000.mrcs", "mode"]


def c_reference_past_end(case):
    blocks = _star(case)
    blocks["particles"].loc[0, "rlnImageName"] = f"{N_PARTICLES + 5:06d}@particles_000.mrcs"
    p = _write_star(case, blocks, "past_end.star")
    return _train(case, p), ["particles_000.mrcs", str(N_PARTICLES + 5)]


def c_mixed_boxes(case):
    with mrcfile.new(case / "sim" / "small.mrcs") as m:
        m.set_data(np.ones((2, 16, 16), np.float32))
    blocks = _star(case)
    blocks["particles"].loc[1, "rlnImageName"] = "000001@small.mrcs"
    p = _write_star(case, blocks, "mixed.star")
    return _train(case, p), ["small.mrcs", "16"]


def c_odd_box(case):
    with mrcfile.new(case / "sim" / "odd.mrcs") as m:
        m.set_data(np.random.default_rng(0).normal(size=(N_PARTICLES, 33, 33)).astype(np.float32))
    blocks = _star(case)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@odd.mrcs" for i in range(N_PARTICLES)]
    blocks["optics"]["rlnImageSize"] = 33
    p = _write_star(case, blocks, "odd.star")
    return _train(case, p), ["odd", "33"]


def c_non_square(case):
    with mrcfile.new(case / "sim" / "rect.mrcs") as m:
        m.set_data(np.random.default_rng(0).normal(size=(N_PARTICLES, 32, 30)).astype(np.float32))
    blocks = _star(case)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@rect.mrcs" for i in range(N_PARTICLES)]
    p = _write_star(case, blocks, "rect.star")
    return _train(case, p), ["rect.mrcs", "square"]


def c_nan_pixels(case):
    def poke(d):
        d[5, 3, 4] = np.nan
    _set_stack_pixels(case, poke)
    return _train(case), ["particles_000.mrcs", "NaN"]


def c_nan_pixels_float16(case):
    # RELION writes float16 stacks (MRC mode 12): a NaN there is refused the same way.
    def poke(d):
        d[4, 6, 7] = np.nan
    with mrcfile.open(_stack(case), mode="r+", permissive=True) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        data = np.array(m.data).astype(np.float16)
        poke(data)
        m.set_data(data)
        assert int(m.header.mode) == 12
    return _train(case), ["particles_000.mrcs", "NaN"]


def c_inf_pixels(case):
    def poke(d):
        d[7, 10, 11] = np.inf
    _set_stack_pixels(case, poke)
    return _train(case), ["particles_000.mrcs", "inf"]


def c_blank_image(case):
    def poke(d):
        d[2] = 0.0
    _set_stack_pixels(case, poke)
    return _train(case), ["particles_000.mrcs", "image 3", "blank"]


def c_cs_without_blob(case):
    # A cryoSPARC table with CTF fields but no blob/ fields (e.g. a passthrough file).
    arr = np.zeros(N_PARTICLES, dtype=[("uid", "<u8"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                                       ("ctf/accel_kv", "<f4")])
    arr["ctf/df1_A"] = 15000
    with open(case / "sim" / "noblob.cs", "wb") as f:
        np.save(f, arr)
    return _train(case, case / "sim" / "noblob.cs"), ["noblob.cs", "blob"]


def c_cs_with_pickle(case):
    arr = np.array([(b"x", {"a": 1})], dtype=[("blob/path", "S8"), ("evil", object)])
    with open(case / "sim" / "evil.cs", "wb") as f:
        np.save(f, arr, allow_pickle=True)
    return _train(case, case / "sim" / "evil.cs"), ["evil.cs", "pickle"]


def c_outdir_holds_run(case):
    shutil.copytree(case / "run", case / "out")
    return _train(case), [str(case / "out"), "previous run"]


def c_outdir_is_file(case):
    (case / "out").write_text("x")
    return _train(case), [str(case / "out"), "not a directory"]


def c_resume_without_checkpoint(case):
    return [*_train(case), "--resume"], [str(case / "out"), "checkpoint"]


def c_poses_wrong_count(case):
    blocks = _star(case)
    blocks["particles"] = blocks["particles"].iloc[:5]
    p = _write_star(case, blocks, "five.star")
    return [*_train(case), "--poses", str(p)], ["five.star", "12"]


def c_poses_without_angles(case):
    blocks = _star(case)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    p = _write_star(case, blocks, "noangles.star")
    return [*_train(case), "--poses", str(p)], ["noangles.star", "poses"]


def c_config_unknown_key(case):
    p = case / "cfg.yaml"
    p.write_text("batch_size: 8\nlearning_rate_of_doom: 3\n")
    return [*_train(case), "--config", str(p)], ["cfg.yaml", "learning_rate_of_doom"]


def c_config_not_yaml(case):
    p = case / "cfg.yaml"
    p.write_text("batch_size: [8\n  - :\n")
    return [*_train(case), "--config", str(p)], ["cfg.yaml", "YAML"]


def c_ground_truth_other_box(case):
    p = write_map(case / "gt64.mrc", np.zeros((64, 64, 64)))
    return [*_train(case), "--ground-truth", str(p)], ["gt64.mrc", "64"]


def c_ground_truth_truncated(case):
    p = write_map(case / "gt.mrc", np.ones((BOX, BOX, BOX)))
    p.write_bytes(p.read_bytes()[:2000])
    return [*_train(case), "--ground-truth", str(p)], ["gt.mrc", "truncated"]


def c_bad_option_value(case):
    return [*_train(case), "--batch-size", "0"], ["batch_size"]


def c_predict_truncated_checkpoint(case):
    p = case / "run" / "checkpoint.pt"
    p.write_bytes(p.read_bytes()[:1000])
    return (["predict-poses", str(p), str(case / "sim" / "particles.star"), "--out", str(case / "o.star")],
            ["checkpoint.pt", "checkpoint"])


def c_predict_other_box(case):
    other = case / "sim64"
    assert main(["simulate", "--box", "64", "--n", "4", "--no-noise", "--device", "cpu", "--quiet",
                 "--outdir", str(other)]) == 0
    return (["predict-poses", str(case / "run" / "checkpoint.pt"), str(other / "particles.star"),
             "--out", str(case / "o.star")], ["particles.star", "64"])


def c_evaluate_truncated_map(case):
    vol = case / "run" / "volume.mrc"
    vol.write_bytes(vol.read_bytes()[:3000])
    return (["evaluate", "--map", str(vol), "--gt-map", str(case / "sim" / "ground_truth.mrc"),
             "--outdir", str(case / "ev")], ["volume.mrc", "truncated"])


def c_evaluate_unknown_symmetry(case):
    return (["evaluate", "--map", str(case / "run" / "volume.mrc"), "--gt-map",
             str(case / "sim" / "ground_truth.mrc"), "--outdir", str(case / "ev"), "--symmetry", "I5"],
            ["symmetry", "I5"])


def c_train_unknown_symmetry(case):
    return [*_train(case), "--sym", "C0"], ["--sym", "C0"]


def c_train_symmetry_auto_with_given_poses(case):
    return [*_train(case), "--sym", "auto", "--poses", str(case / "sim" / "particles.star")], ["--sym auto"]


def c_train_symmetry_with_the_papers_training(case):
    return [*_train(case), "--sym", "D7", "--ab-initio", "encoder"], ["--sym D7", "encoder"]


def c_info_missing(case):
    return ["info", str(case / "absent.cs")], ["absent.cs", "not found"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__[2:] for c in CASES])
def test_bad_input(build, good_set, tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(good_set, case)
    argv, names = build(case)
    existed = (case / "out").exists()
    run_fails(capsys, case, *argv, names=tuple(names))
    if not existed:
        assert not (case / "out").exists(), "the output directory was created for a failed run"


def test_corpus_is_large_enough():
    assert len(CASES) >= 20


# torch warns about the plain pickle's protocol before its weights-only unpickler refuses it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickle_checkpoint_is_refused(good_set, tmp_path, capsys):
    """A checkpoint whose pickle would run code is refused by weights_only loading; the code
    never runs."""
    case = tmp_path / "case"
    shutil.copytree(good_set, case)
    marker = case / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = torch.load(case / "run" / "checkpoint.pt", weights_only=True)
    ckpt["payload"] = Exploit()
    bad = case / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump(ckpt, f)  # an old-style pickle file: torch.load unpickles it
    torch.save(ckpt, case / "evil_zip.pt")
    for path in (bad, case / "evil_zip.pt"):
        msg = run_fails(capsys, case, "predict-poses", path, case / "sim" / "particles.star",
                        "--out", case / "o.star", names=(path.name,))
        assert "checkpoint" in msg
        assert not marker.exists()
