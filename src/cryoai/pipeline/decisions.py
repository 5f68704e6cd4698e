"""The policy's decisions: pure functions of measured figures and the :class:`Policy`.

Nothing here reads images or runs a search: each function takes what a stage measured (an
energy, a share explained, an SCF*, an encoder's check) and returns what the run does next and
what it says, so that the policy is tested without a simulated run (tests/pipeline). The
thresholds are explained in docs/pipeline.md.
"""

from __future__ import annotations

import math

from ..physics.grids import max_paired_radius_px
from ..policy import Policy
from .records import AttemptFigures, RetryDecision


def choose_start(search_start: str, energy: float, policy: Policy) -> tuple[str, str]:
    """The search's start without ``--initial-map`` (docs/pipeline.md#search-start).

    Parameters
    ----------
    search_start : the option: "auto", "blob" or "classes".
    energy : the images' whitened signal energy per image within ``policy.signal_band_px``
        (NaN: unknown, no noise measured).

    Returns
    -------
    ("blob" or "classes", what the run says: empty when the option decided).
    """
    if search_start != "auto":
        return search_start, ""
    if energy != energy:  # NaN: noise-free images, or --noise-model white
        return (
            "blob",
            "search: the images' signal energy is unknown (no noise measured): starting from a blob",
        )
    choice = "classes" if energy < policy.class_start_energy else "blob"
    said = (
        f"search: whitened signal energy {energy:.0f} per image within {policy.signal_band_px:g} px: "
        "starting "
        + ("from 2D class averages (below " if choice == "classes" else "from a blob (at or above ")
        + f"{policy.class_start_energy:.0f})"
    )
    return choice, said


def working_box(box_px: int, bands_px: tuple[float, ...], policy: Policy) -> int | None:
    """The box (px) the search and the stages before the reconstruction run at
    (``policy.search_box_px``; docs/pipeline.md#working-box), grown where a band they use
    (``bands_px``, frequency px: cycles per box, the same at either box) would not fit with 2 px
    to spare; None: the full box (the policy's box is 0, or the box is not larger, or odd).
    """
    target = int(policy.search_box_px)
    if target <= 0 or box_px % 2:
        return None
    need = 2 * (math.ceil(max(bands_px, default=0.0)) + 2)
    work = max(target, need)
    work += work % 2
    return work if work < box_px else None


def first_guess_band(
    assign_radius_px: float | None,
    search_band_px: float,
    refine_radius_frac: float,
    box_px: int,
    noise,
    policy: Policy,
) -> tuple[float | None, dict | None]:
    """The band (frequency px) of the global first guesses (docs/pipeline.md#first-guess-band).

    ``(assign_radius_px, None)`` when it is given or the images' signal is unknown (``noise``
    None); ``(None, figures)`` (the search's final band) when the images' whitened signal energy
    within that band is at least ``policy.wide_first_guess_energy``, or when the wider band adds
    less than ``policy.wide_band_min_gain`` of it; else the refinement's final band
    (``refine_radius_frac`` of the largest paired radius), where it is the wider.

    Parameters
    ----------
    assign_radius_px : the option (None: from the data).
    search_band_px : the search's final band.
    refine_radius_frac : the assignment refinement's final band, fraction of the largest paired radius.
    noise : the run's :class:`cryoai.data.noise.NoiseModel`, or None.
    """
    if assign_radius_px is not None or noise is None:
        return assign_radius_px, None
    base_px = float(search_band_px)
    wide_px = round(refine_radius_frac * max_paired_radius_px(box_px), 2)
    energy = noise.information(base_px)
    wide_energy = noise.information(wide_px)
    figures = {
        "stage": "assignment_band",
        "search_band_px": base_px,
        "energy_in_search_band": round(energy, 1),
        "wide_band_px": wide_px,
        "energy_in_wide_band": round(wide_energy, 1),
        "threshold": policy.wide_first_guess_energy,
        "min_gain": policy.wide_band_min_gain,
    }
    if (
        not energy < policy.wide_first_guess_energy
        or not wide_px > base_px
        or not wide_energy >= policy.wide_band_min_gain * energy
    ):
        return None, {**figures, "first_guess_band_px": base_px}
    return wide_px, {**figures, "first_guess_band_px": wide_px}


def first_guess_said(band_px: float | None, figures: dict, policy: Policy) -> str | None:
    """What the run says of :func:`first_guess_band`'s choice (None: nothing worth saying)."""
    energy, wide = figures["energy_in_search_band"], figures["energy_in_wide_band"]
    base_px, wide_px = figures["search_band_px"], figures["wide_band_px"]
    if band_px is not None:
        return (
            f"assignment: the images' whitened signal energy within {base_px:g} px is {energy:.0f} per "
            f"image (below {policy.wide_first_guess_energy:.0f}): their poses (and 2D classes) are "
            f"first guessed within {band_px:g} px ({wide:.0f} there)"
        )
    if energy < policy.wide_first_guess_energy and wide_px > base_px:
        return (
            f"assignment: the images' whitened signal energy within {base_px:g} px is {energy:.0f} per "
            f"image (below {policy.wide_first_guess_energy:.0f}), but the wider {wide_px:g} px band adds "
            f"little to it ({wide:.0f}, less than {policy.wide_band_min_gain:g}x): their poses (and 2D "
            f"classes) are first guessed within {base_px:g} px"
        )
    return None


def judge_attempt(
    attempt: AttemptFigures,
    best_explained: float | None,
    attempts_left: int,
    auto_start: bool,
    policy: Policy,
) -> RetryDecision:
    """Which search the run keeps, and whether it searches again
    (docs/pipeline.md#search-attempts-and-acceptance).

    - A map that explains less than ``policy.min_explained`` is a wrong start: kept only if it
      is the best so far, and searched again (from class averages after a blob's, with
      ``--search-start auto``).
    - A search from class averages below ``policy.doubtful_explained_from_classes`` is
      doubtful: the best so far is kept (a blob's with preferred views included), and searched
      again from another seed.
    - A blob's search whose views came out preferred (SCF* below ``policy.preferred_views_scf``)
      is kept for now and searched again from class averages (``--search-start auto``).
    - Otherwise the attempt is kept and the search ends.

    Parameters
    ----------
    attempt : the attempt's figures.
    best_explained : the share the best attempt so far explains (None: none yet).
    attempts_left : retries left after this one.
    auto_start : ``--search-start auto`` (the start may change from a blob to class averages).
    """
    explained, start = attempt.explained, attempt.start
    better = best_explained is None or explained > best_explained
    passed = not explained < policy.min_explained  # (NaN: unknown, no noise model: accepted)
    if passed and start == "classes" and explained < policy.doubtful_explained_from_classes:
        if attempts_left == 0:
            return RetryDecision(keep=better, again=False, next_start=start)
        return RetryDecision(
            keep=better,
            again=True,
            next_start=start,
            said=(
                f"search: the map from class averages explains {explained:.0%} of the signal the "
                f"images carry (doubtful below {policy.doubtful_explained_from_classes:.0%}): searching "
                "again from another seed"
            ),
        )
    if (
        passed
        and start == "blob"
        and auto_start
        and attempt.views_scf < policy.preferred_views_scf
        and attempts_left > 0
    ):
        # A blob's map is made mostly of the common views, and the rare ones are posed against it
        # wrong; class averages weigh each view alike. The blob's is kept if those fail or doubt.
        return RetryDecision(
            keep=True,
            again=True,
            next_start="classes",
            said=(
                f"search: the subset's views came out preferred (SCF* {attempt.views_scf:.2f} < "
                f"{policy.preferred_views_scf}), and a search from a blob poses the rare views wrong: "
                "searching again from 2D class averages"
            ),
        )
    if passed:
        return RetryDecision(keep=True, again=False, next_start=start)
    next_start, again = start, "searching again from another seed"
    if start == "blob" and auto_start:
        next_start, again = "classes", "searching again from 2D class averages"
    return RetryDecision(
        keep=better,
        again=attempts_left > 0,
        next_start=next_start,
        said=(
            f"search: the map explains {explained:.0%} of the signal the images carry (a right one about "
            f"100%): a wrong start; " + (again if attempts_left > 0 else "no retries left")
        ),
    )


def search_warnings(
    source: str, attempts: int, explained: float, energy: float, start: str, policy: Policy
) -> list[str]:
    """The warnings on the kept search: its map explains too little, or the images carry so
    little signal that a map that explains enough may still be wrong.

    Parameters
    ----------
    source : the particle file (for the message).
    attempts : how many searches ran.
    explained : the share the kept map explains.
    energy : the images' whitened signal energy per image within ``policy.signal_band_px``.
    start : the kept search's start: "blob", "classes" or "map".
    """
    band = f"{policy.signal_band_px:g} px"
    if not explained < policy.min_explained:
        low = {
            "map": policy.low_signal_energy_with_start,
            "classes": policy.low_signal_energy_from_classes,
            "blob": policy.low_signal_energy,
        }[start]
        started = {"map": "from a given map ", "classes": "from class averages ", "blob": ""}[start]
        if energy < low:
            return [
                f"{source}: the images carry little signal each (whitened signal energy {energy:.0f} per "
                f"image within {band}, below the {low:.0f} under which the search {started}has failed on "
                f"every set it was measured on): the map and poses are likely wrong"
            ]
        return []
    return [
        f"{source}: the ab initio search failed {attempts} time(s): its best map explains only "
        f"{explained:.0%} of the signal the images carry (a right one about 100%; a wrong start below "
        f"{policy.min_explained:.0%}), so the map and poses are likely wrong. Either the images carry too "
        f"little signal each (whitened signal energy {energy:.0f} per image within {band}; below "
        f"{policy.low_signal_energy:.0f} a search from a blob is not expected to converge: "
        f"docs/pipeline.md#search-start), or junk or preferred views mislead it"
    ]


def is_doubtful(explained: float, from_classes: bool, policy: Policy) -> bool:
    """Whether a kept search from class averages is doubtful (it passed, but explains less than
    ``policy.doubtful_explained_from_classes``).
    """
    return from_classes and policy.min_explained <= explained < policy.doubtful_explained_from_classes


def doubtful_warning(
    source: str, attempts: int, explained: float, agreement: float | None, policy: Policy
) -> str:
    """The warning on a doubtful search from class averages, with how far the other attempts'
    poses agree with its own (``agreement``: a share of the particles; None: one attempt).
    """
    said = (
        f"the search from 2D class averages is doubtful: the best of {attempts} attempt(s) explains "
        f"{explained:.0%} of the signal the images carry (doubtful below "
        f"{policy.doubtful_explained_from_classes:.0%})"
    )
    if agreement is None:
        said += ": the map and poses may be wrong"
    elif agreement < policy.agreeing_share:
        said += (
            f", and the attempts pose only {agreement:.0%} of the particles alike (two that found the same "
            f"map pose most alike): the map and poses are likely wrong"
        )
    else:
        said += (
            f", but two attempts pose {agreement:.0%} of the particles alike: the map may be right; check it"
        )
    return f"{source}: {said}"


def should_balance_views(enabled: bool, views_scf: float, particles: int, policy: Policy) -> bool:
    """Whether the subset's poses are refined against view-balanced maps (docs/pipeline.md#view-balancing)."""
    return enabled and views_scf < policy.preferred_views_scf and particles >= policy.min_subset_particles


def views_warning(
    source: str, views_scf: float, searched: bool, balanced: bool, policy: Policy
) -> str | None:
    """The warning on preferred views (SCF* below ``policy.preferred_views_scf``), or None."""
    if not views_scf < policy.preferred_views_scf:
        return None
    search = ""
    if searched:
        search = (
            "; the search's poses were refined against maps that weigh every view alike, but a search "
            "from such views can still pose the rare views wrong: check the map"
            if balanced
            else "; a search from such views can also pose the rare views wrong (its map lacks them): check "
            "the map"
        )
    return (
        f"{source}: the views are preferred (SCF* {views_scf:.2f} < {policy.preferred_views_scf}): the map's "
        f"resolution is anisotropic, smeared along the undersampled directions{search} (cryoai report "
        "shows the view distribution)"
    )


def encoder_wanted(pose_encoder: str, particles_to_pose: int) -> tuple[bool, str]:
    """Whether the pose encoder stage runs (docs/pipeline.md#pose-encoder): ``off`` never,
    ``always`` always (e.g. for ``predict-poses`` on new particles later), ``auto`` only where
    it may pose particles of this run (some lie outside the search's subset). Returns the
    verdict and, when it is skipped under ``auto``, why.
    """
    if pose_encoder == "off":
        return False, ""
    if pose_encoder == "always" or particles_to_pose > 0:
        return True, ""
    return False, ("encoder: every particle already has its pose: no pose encoder is trained "
                   "(--pose-encoder always trains one, for predict-poses on new particles)")


def encoder_may_pay(particles_to_pose: int, global_s: float, amortized_s: float,
                    budget_s: float) -> tuple[bool, str]:
    """Whether training the pose encoder can pay for itself in this run, before it is trained
    (docs/pipeline.md#pose-encoder): at best it gives every one of ``particles_to_pose`` its
    first guess at ``amortized_s`` (s per particle, measured on this machine) instead of the
    global search's ``global_s``; if even that saves less than its ``budget_s`` of training, it
    is not trained. Returns the verdict and, when it is not, why.
    """
    saved = particles_to_pose * (global_s - amortized_s)
    if saved >= budget_s:
        return True, ""
    return False, (
        f"encoder: not trained: the global search gives the {particles_to_pose:,} other particles their "
        f"first guess at {1 / global_s:,.0f} img/s here and the encoder's hypotheses at "
        f"{1 / amortized_s:,.0f} img/s, so it would save at most {max(saved, 0.0):.0f} s, less than its "
        f"{budget_s:.0f} s of training (--pose-encoder always trains one, e.g. for predict-poses on new "
        "particles)"
    )


def encoder_pays(check: dict, policy: Policy) -> tuple[bool, str]:
    """Whether the pose encoder poses the other particles (docs/pipeline.md#pose-encoder): at
    least ``policy.encoder_min_amortized_fraction`` of the particles skip the global search as
    accurately, and the combination is ``policy.encoder_min_speedup`` times faster than the
    global search. Returns the verdict and, when it fails, why.
    """
    fraction = check["amortized_fraction"]
    combined, global_ = check["combined_images_per_s"], check["global_images_per_s"]
    if fraction < policy.encoder_min_amortized_fraction:
        return False, (
            f"only {fraction:.0%} of the particles could skip the global search as accurately (at "
            f"least {policy.encoder_min_amortized_fraction:.0%} needed; --encoder-minutes trains "
            "it longer)"
        )
    if not 1 / combined * policy.encoder_min_speedup <= 1 / global_:
        return False, (
            f"with it, {combined:.0f} img/s; the global search alone poses {global_:.0f} img/s here, "
            f"and the encoder must be {policy.encoder_min_speedup:g}x faster to be worth its errors"
        )
    return True, ""


def encoder_min_confidence(check: dict | None, pose_encoder: str) -> float:
    """The confidence below which a particle gets the global first guess: the check's
    calibration, or 0 (none) with ``--pose-encoder always``.
    """
    if pose_encoder == "always" or not check:
        return 0.0
    return float(check.get("min_confidence", 0.0))


def is_inverted(skewness: float, policy: Policy) -> bool:
    """Whether a map is negative: the images' contrast inverted (docs/pipeline.md#contrast)."""
    return skewness < policy.inverted_skewness


def symmetry_holds(agreement, policy: Policy):
    """Which operators of a group the data support (docs/pipeline.md#symmetry): those whose
    turn of one half map agrees with the other at least ``symmetry_min_agreement`` as well as
    the halves agree (``agreement``: (G,) tensor, the identity's 1). Returns a (G,) bool tensor.
    """
    return agreement >= policy.symmetry_min_agreement
