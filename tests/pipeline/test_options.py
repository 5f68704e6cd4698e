"""The run's options: one source (TrainConfig's fields) for the flags, their help and choices;
the options in Angstrom turned into the box's units at one boundary; strict JSON logs."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

import numpy as np
import pytest

from cryoai.cli.train import add_args
from cryoai.errors import InputError
from cryoai.pipeline.settings import in_pixels, mask_radius_px, search_settings
from cryoai.training.config import TrainConfig
from cryoai.training.run_dir import strict_json


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryoai train")
    add_args(parser)
    return parser


def test_every_option_has_its_sentence_and_choices_are_listed():
    parser = _parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and not action.help.startswith("("), action.option_strings
        assert len(action.help.split()) >= 4, action.option_strings  # a sentence, not a default
    for f in fields(TrainConfig):
        if f.name != "policy":
            assert f.metadata.get("help"), f.name
    by_dest = {a.dest: a for a in parser._actions}
    assert set(by_dest["cfg_search_start"].choices) == {"auto", "blob", "classes"}
    assert set(by_dest["cfg_noise_model"].choices) == {"micrograph", "global", "white"}
    text = parser.format_help()
    assert "common options" in text and "expert: the policy's thresholds" in text
    # the common group comes first and fits a screen
    common = text.split("common options:")[1].split("\n\n")[0]
    assert len(common.splitlines()) < 60


def test_flags_parse_into_the_config():
    from cryoai.training.config import resolve_config

    args = _parser().parse_args(["p.star", "--outdir", "o", "--search-start", "classes",
                                 "--particle-diameter-a", "200", "--no-balance-views", "--max-minutes", "5"])
    cfg = resolve_config(args)
    assert cfg.search_start == "classes" and cfg.particle_diameter_a == 200.0
    assert cfg.balance_views is False and cfg.max_minutes == 5.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["p.star", "--outdir", "o", "--search-start", "sideways"])


def test_angstrom_options_become_the_box_units():
    cfg = TrainConfig(particle_diameter_a=200.0, search_resolution_a=32.0)
    box, pixel_a = 64, 5.0  # a 320 A box
    resolved = in_pixels(cfg, box, pixel_a)
    assert resolved.mask_radius_frac == pytest.approx(100 / 320)
    assert mask_radius_px(resolved, box) == pytest.approx(20.0)
    assert resolved.search_radius_end == pytest.approx(10.0)  # 320 A / 32 A
    assert search_settings(resolved, box).radius_end_px == pytest.approx(10.0)
    assert in_pixels(resolved, box, pixel_a) == resolved  # idempotent
    assert in_pixels(TrainConfig(), box, pixel_a) == TrainConfig()  # nothing given: nothing changes
    with pytest.raises(InputError, match="wider than the box"):
        in_pixels(TrainConfig(particle_diameter_a=400.0), box, pixel_a, "p.star")
    with pytest.raises(InputError, match="Nyquist"):
        in_pixels(TrainConfig(search_resolution_a=9.0), box, pixel_a, "p.star")  # Nyquist is 10 A
    with pytest.raises(InputError, match="first band"):
        in_pixels(TrainConfig(search_resolution_a=80.0), box, pixel_a, "p.star")  # 4 px < 5 px


def test_logs_are_strict_json():
    record = {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2.5), "d": np.arange(2),
              "e": (1, 2)}
    text = json.dumps(strict_json(record), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2.5, "d": [0, 1], "e": [1, 2]}
    assert strict_json(math.pi) == math.pi
