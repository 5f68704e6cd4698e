"""The policy's decisions on stage records, without a simulated run: the search's start, which
attempt is kept and whether it runs again, the warnings, the encoder's use; and the policy as
options (YAML, flags, old configs).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields, replace

import pytest

from cryoai.errors import InputError
from cryoai.pipeline import decisions
from cryoai.pipeline.records import AttemptFigures
from cryoai.policy import Policy, describe
from cryoai.training.config import TrainConfig, add_config_args, resolve_config

P = Policy()


def _search(shares, scfs=None, *, first="blob", retries=2, auto=True, policy=P):
    """The search's retry loop as :func:`cryoai.pipeline.search.search_stage` runs it, on given
    shares explained (and SCF*s): returns (starts tried, kept attempt, its share, what was said).
    """
    scfs = scfs or [1.0] * len(shares)
    best, start, starts, said = None, first, [], []
    for i, (share, scf) in enumerate(zip(shares, scfs, strict=True)):
        starts.append(start)
        verdict = decisions.judge_attempt(AttemptFigures(i + 1, start, share, scf),
                                          None if best is None else best[1], retries - i, auto, policy)
        if verdict.keep:
            best = (i + 1, share)
        if verdict.said:
            said.append(verdict.said)
        if not verdict.again:
            break
        start = verdict.next_start
    return starts, best[0], best[1], said


def test_the_start_follows_the_images_signal():
    assert decisions.choose_start("auto", P.class_start_energy - 1, P)[0] == "classes"
    assert decisions.choose_start("auto", P.class_start_energy, P)[0] == "blob"
    start, said = decisions.choose_start("auto", float("nan"), P)
    assert start == "blob" and "unknown" in said
    assert decisions.choose_start("classes", 1e6, P) == ("classes", "")
    assert decisions.choose_start("blob", 1.0, P) == ("blob", "")
    assert decisions.choose_start("auto", 300, replace(P, class_start_energy=400))[0] == "classes"


def test_a_converged_blob_search_ends_the_search():
    assert _search([0.95])[:3] == (["blob"], 1, 0.95)


def test_a_wrong_start_searches_again_from_class_averages_then_keeps_the_best():
    starts, kept, share, said = _search([0.40, 0.50, 0.45])
    assert starts == ["blob", "classes", "classes"] and (kept, share) == (2, 0.50)
    assert "a wrong start; searching again from 2D class averages" in said[0]
    assert "no retries left" in said[-1]
    # --search-start blob: the retries stay with a blob
    assert _search([0.40, 0.50, 0.45], auto=False)[0] == ["blob", "blob", "blob"]


def test_a_doubtful_search_from_class_averages_runs_again_and_a_converged_retry_ends_it():
    starts, kept, share, _ = _search([0.70, 0.90, 0.72], first="classes")
    assert starts == ["classes", "classes"] and (kept, share) == (2, 0.90)
    # every attempt doubtful: the best is kept
    assert _search([0.70, 0.75, 0.72], first="classes")[1:3] == (2, 0.75)


def test_a_blob_search_with_preferred_views_is_kept_over_doubtful_class_averages():
    starts, kept, share, said = _search([0.86, 0.78, 0.74], [0.3, 0.9, 0.9])
    assert starts == ["blob", "classes", "classes"] and (kept, share) == (1, 0.86)
    assert "views came out preferred" in said[0]
    # class averages that explain more than the blob's: the best of them
    assert _search([0.72, 0.78, 0.74], [0.3, 0.9, 0.9])[1:3] == (2, 0.78)
    # one converged from class averages: kept (it poses the rare views)
    assert _search([0.86, 0.85], [0.3, 0.9])[1:3] == (2, 0.85)
    # no retries left: the blob's is kept as it is
    assert _search([0.86], [0.3], retries=0)[1:3] == (1, 0.86)


def test_an_unknown_share_is_accepted():
    assert _search([float("nan")])[1] == 1  # no noise model: nothing to judge by


def test_the_policy_moves_the_borders():
    strict = replace(P, min_explained=0.9, doubtful_explained_from_classes=0.95)
    assert _search([0.85, 0.86, 0.87], policy=strict)[:3] == (["blob", "classes", "classes"], 3, 0.87)
    assert _search([0.85, 0.86, 0.87], policy=P)[:3] == (["blob"], 1, 0.85)


def test_the_warnings_on_the_kept_search():
    failed = decisions.search_warnings("x.star", 3, 0.5, 300.0, "blob", P)
    assert len(failed) == 1 and "failed 3 time(s)" in failed[0] and "explains only 50%" in failed[0]
    for start, low in (("blob", P.low_signal_energy), ("classes", P.low_signal_energy_from_classes),
                       ("map", P.low_signal_energy_with_start)):
        assert decisions.search_warnings("x.star", 1, 0.9, low, start, P) == []
        said = decisions.search_warnings("x.star", 1, 0.9, low - 1, start, P)
        assert len(said) == 1 and f"below the {low:.0f}" in said[0]
    assert decisions.is_doubtful(0.75, True, P) and not decisions.is_doubtful(0.75, False, P)
    assert not decisions.is_doubtful(0.85, True, P) and not decisions.is_doubtful(0.5, True, P)
    assert "may be wrong" in decisions.doubtful_warning("x", 1, 0.75, None, P)
    assert "likely wrong" in decisions.doubtful_warning("x", 3, 0.75, P.agreeing_share - 0.1, P)
    assert "check it" in decisions.doubtful_warning("x", 3, 0.75, P.agreeing_share, P)


def test_views_are_balanced_and_warned_about_below_the_border():
    border = P.preferred_views_scf
    assert decisions.should_balance_views(True, border - 0.01, 100, P)
    assert not decisions.should_balance_views(True, border, 100, P)
    assert not decisions.should_balance_views(False, 0.3, 100, P)
    assert not decisions.should_balance_views(True, 0.3, P.min_subset_particles - 1, P)
    assert decisions.views_warning("x", border, True, False, P) is None
    searched = decisions.views_warning("x", 0.3, True, True, P)
    assert "refined against maps that weigh every view alike" in searched
    assert "pose the rare views wrong" not in decisions.views_warning("x", 0.3, False, False, P)


def _check(fraction, combined, global_):
    return {"amortized_fraction": fraction, "combined_images_per_s": combined, "global_images_per_s": global_,
            "min_confidence": 0.4}


def test_the_encoder_is_used_only_where_it_pays():
    fast = P.encoder_min_speedup * 100
    assert decisions.encoder_pays(_check(0.5, fast + 1, 100), P) == (True, "")
    used, why = decisions.encoder_pays(_check(P.encoder_min_amortized_fraction - 0.01, 1e6, 100), P)
    assert not used and "skip the global search" in why
    used, why = decisions.encoder_pays(_check(0.9, fast - 1, 100), P)
    assert not used and "faster" in why
    assert decisions.encoder_min_confidence(_check(0.5, 1, 1), "auto") == 0.4
    assert decisions.encoder_min_confidence(_check(0.5, 1, 1), "always") == 0.0
    assert decisions.encoder_min_confidence(None, "auto") == 0.0


def test_a_negative_map_is_inverted():
    assert decisions.is_inverted(P.inverted_skewness - 0.01, P)
    assert not decisions.is_inverted(P.inverted_skewness, P) and not decisions.is_inverted(1.5, P)


def test_every_threshold_has_its_unit_meaning_and_evidence():
    for f in fields(Policy):
        assert {"unit", "help", "measured"} <= set(f.metadata), f.name
        assert all(f.metadata[k].strip() for k in ("unit", "help", "measured")), f.name
        assert describe(f.name)


def test_the_policy_as_options(tmp_path):
    # YAML nests it; a flag of the same name overrides it; the rest keeps its defaults
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("policy:\n  class_start_energy: 300\n  junk_threshold: 2.5\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--preset")
    add_config_args(parser)
    cfg = resolve_config(parser.parse_args(["--config", str(yaml_path), "--junk-threshold", "4"]))
    assert cfg.policy.class_start_energy == 300.0 and cfg.policy.junk_threshold == 4.0
    assert cfg.policy.min_explained == P.min_explained
    # round trip through the dict that config.yaml and checkpoints hold
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # the configs of runs that had min_explained and junk_threshold as options still read
    old = TrainConfig.from_dict({"min_explained": 0.6, "junk_threshold": 2.0, "seed": 3})
    assert old.policy.min_explained == 0.6 and old.policy.junk_threshold == 2.0 and old.seed == 3
    with pytest.raises(InputError, match="unknown policy option"):
        TrainConfig.from_dict({"policy": {"no_such_threshold": 1}})
    with pytest.raises(InputError, match="must be a number"):
        TrainConfig.from_dict({"policy": {"min_explained": "high"}})
    assert math.isclose(TrainConfig().policy.preferred_views_scf, 0.81)


def test_the_encoder_trains_only_where_it_may_pose_particles_or_when_asked():
    assert decisions.encoder_wanted("auto", 10) == (True, "")
    wanted, why = decisions.encoder_wanted("auto", 0)
    assert not wanted and "--pose-encoder always" in why
    assert decisions.encoder_wanted("always", 0) == (True, "")
    assert decisions.encoder_wanted("off", 10) == (False, "")


def test_the_encoder_is_trained_only_where_it_can_save_its_training_time():
    # 95,000 particles, global first guess 1/1,800 s, the encoder's 1/2,000 s: at best 5.3 s
    # saved, against 120 s of training: not trained, and said with the figures.
    pays, why = decisions.encoder_may_pay(95_000, 1 / 1800, 1 / 2000, 120.0)
    assert not pays and "1,800 img/s" in why and "2,000 img/s" in why and "at most 5 s" in why
    # a million particles where the encoder's first guess is 10x faster: 500 s saved at best
    assert decisions.encoder_may_pay(1_000_000, 1 / 1800, 1 / 18000, 120.0) == (True, "")
    # an encoder slower than the global search never pays
    assert not decisions.encoder_may_pay(10**9, 1 / 2000, 1 / 1000, 1.0)[0]
