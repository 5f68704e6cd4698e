"""The policy of the default run: every tuned threshold that decides it, in one place.

:class:`Policy` is a frozen dataclass. Each field carries its meaning, its unit and where its
value was measured (``dataclasses.fields(Policy)[i].metadata``); ``cryoai train --help`` shows
them in its expert group, and each can be set in a config YAML (under ``policy:``) or as a flag
of the same name (``--class-start-energy 300``). docs/pipeline.md#policy explains each in the
stage it decides.

The mechanisms (``cryoai.reconstruction``, ``cryoai.training``) take these values as arguments;
only ``cryoai.training.config`` (which holds the run's policy) and ``cryoai.pipeline`` (which
decides with it) import this module (an import-linter contract in pyproject.toml keeps it so).

"Energy" below is an image's whitened signal energy within ``signal_band_px``
(:meth:`cryoai.data.noise.NoiseModel.information`: the squared signal over the noise power,
summed over the Fourier coefficients of the band, averaged over every pick, junk included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _tuned(default, unit: str, meaning: str, measured: str):
    """A policy field: its default, and its unit, meaning and evidence as metadata."""
    return field(default=default, metadata={"unit": unit, "help": meaning, "measured": measured})


@dataclass(frozen=True)
class Policy:
    """Every tuned threshold of the default run (see the module docstring)."""

    # --- what the images carry
    signal_band_px: float = _tuned(
        10.0,
        "frequency px",
        "band within which each image's whitened signal energy is measured for the run's decisions",
        "the search's final band (--search-radius-end): the band its poses are found in",
    )
    # --- the box the search runs at
    search_box_px: int = _tuned(
        64,
        "px",
        "the search, its first guesses, the pose encoder and the assignment run on the images "
        "Fourier-cropped to this box (the bands they use, in cycles per box, are unchanged by the "
        "crop); the reconstruction, the junk calls, the 3D classes and the polish at the full box. "
        "0 or the box or more: the full box throughout",
        "every threshold here was measured at 64 px; on a 128 px set the 64 px search gave the same "
        "poses as the 64 px images' run (docs/results.md#box-sizes)",
    )
    # --- the search's start
    class_start_energy: float = _tuned(
        250.0,
        "energy per image",
        "--search-start auto starts from 2D class averages below this energy, else from a blob",
        "the blob start converged on every simulated set at 274 or more and failed on every one at "
        "215 or less (70S large-complex, noise-alone, hostile recipes)",
    )
    # --- which search is kept
    min_explained: float = _tuned(
        0.58,
        "share of the signal",
        "a search whose map explains less of its subset's signal is a wrong start: searched again",
        "right maps explained 0.64-1.2 of the signal, wrong starts less (70S and CFTR-sized sets)",
    )
    doubtful_explained_from_classes: float = _tuned(
        0.82,
        "share of the signal",
        "a search from class averages explaining less is doubtful: searched again from another seed, "
        "and the run warns if the best stays below",
        "converged searches from class averages explained 0.84-0.96, failed ones 0.70-0.78, one at "
        "0.80 half converged (CFTR-sized membrane sets at energies 61-98)",
    )
    agreeing_share: float = _tuned(
        0.5,
        "share of the particles",
        "two searches agree when this share of the particles both posed is posed alike (within 10 "
        "deg, up to a global rotation and mirror)",
        "two searches that found the same map posed most particles alike; failed ones few",
    )
    # --- views
    preferred_views_scf: float = _tuned(
        0.81,
        "SCF*",
        "below it the views are preferred: a blob's search is done again from class averages, the "
        "subset's poses are refined against view-balanced maps, and the run warns",
        "cryoSPARC's Orientation Diagnostics flag (Baldwin & Lyumkis 2020); simulated top-view sets "
        "(SCF* 0.30) needed both remedies",
    )
    min_subset_particles: int = _tuned(
        20,
        "particles",
        "the fewest subset particles the view balancing and the pose encoder stage run on",
        "below it neither has enough particles to weigh or hold out",
    )
    # --- the global first guesses' band
    wide_first_guess_energy: float = _tuned(
        150.0,
        "energy per image",
        "below it, the global first guesses (assignment, junk's second look, 2D classes, "
        "predict-poses) score their hypotheses in the refinement's final band",
        "against the true map of the 70S noise-alone set (energy 93), 61% of the particles were "
        "posed within 10 deg at 10 px and 95% in the wider band; at 215, 10 px posed 91% already",
    )
    wide_band_min_gain: float = _tuned(
        1.15,
        "factor of energy",
        "... and only where that wider band adds at least this factor of the energy",
        "the 70S sets' wider band added 1.20-1.34x and helped; a CFTR-sized set's added 1.10x and its "
        "search from class averages made in it failed on three seeds",
    )
    # --- the start from 2D class averages
    images_per_class: int = _tuned(
        60,
        "images per class",
        "the number of 2D classes of the class-average start aims at this many images per class",
        "averages of about 60 images carry 60 times an image's energy: enough to pose them",
    )
    max_classes: int = _tuned(
        100,
        "classes",
        "the most 2D classes of the class-average start",
        "at 50 classes the rare views of a top-view set joined the common views' classes and were "
        "posed 80-140 deg off; at 83 they were posed within 2 deg",
    )
    class_search_seeds: int = _tuned(
        3,
        "searches",
        "searches of the class averages' poses from different seeds, the one that explains most of "
        "the averages kept",
        "each costs a few seconds; one seed alone lost the start on some sets",
    )
    # --- warnings of a run that carries little signal
    low_signal_energy: float = _tuned(
        150.0,
        "energy per image",
        "below it, a run whose search started from a blob warns that its map and poses may be wrong",
        "the blob search failed on every set at 93 or less, converged or failed at 215-274 depending "
        "on the rest, converged on every set at 274 or more",
    )
    low_signal_energy_from_classes: float = _tuned(
        55.0,
        "energy per image",
        "the same, for a search started from 2D class averages",
        "posed the 70S noise-alone sets at 90-96 and CFTR-sized membrane sets at 61-97; failed at 44 "
        "and below",
    )
    low_signal_energy_with_start: float = _tuned(
        50.0,
        "energy per image",
        "the same, for a search started from a given map (--initial-map)",
        "posed a set at 93 (2.1 deg) from the true map blurred to 60-80 A; failed at 14",
    )
    # --- the pose encoder
    encoder_min_amortized_fraction: float = _tuned(
        0.25,
        "share of the particles",
        "the pose encoder is used only if at least this share of the particles can skip the global "
        "search as accurately",
        "bench_amortized.py at -10 dB, 64 px: 37-59% of the particles were sure enough",
    )
    encoder_min_speedup: float = _tuned(
        1.1,
        "factor of speed",
        "... and if the encoder with the global search for the rest is this much faster than the "
        "global search alone (beyond the timing's noise, +-5%)",
        "1.19-1.22x at 20,000-50,000 particles and 1.08x at 5,000 (bench_amortized.py, 2 CPU cores)",
    )
    # --- contrast
    inverted_skewness: float = _tuned(
        -0.5,
        "skewness",
        "a map whose density skewness inside the mask is below this is negative: the images' "
        "contrast is inverted (protein dark)",
        "maps of molecules are right-skewed: 1.2 to 5.9 for the maps of ../shared/data and cryoai's "
        "reconstructions of them",
    )
    # --- junk
    junk_threshold: float = _tuned(
        3.0,
        "standard deviations",
        "robust distance from the particles' cluster (amplitude, unexplained power) beyond which a "
        "pick is called junk",
        "calls 1.1% of a Gaussian cluster junk; recall 0.97-0.99 at precision 0.96-0.97 on the "
        "hostile sets with 30-50% junk",
    )
    junk_core_share: float = _tuned(
        0.75,
        "share of a Gaussian cluster",
        "the core of the particles' cluster the junk call fits it on (a fixed radius, so that far "
        "junk does not widen the fit)",
        "a fit from the closer half of the particles took in 80% of the empty images on the hostile "
        "set (half of the picks junk); the fixed core none",
    )

    # --- point-group symmetry (--sym)
    symmetry_min_agreement: float = _tuned(
        0.9,
        "share of the half maps' own correlation",
        "--sym imposes a group only where each of its operators turns one C1 half map into a copy "
        "that agrees with the other at least this well (the halves' own agreement is 1); --sym auto "
        "proposes the largest group that passes",
        "ab initio C1 half maps at 32 px (upsampled twice): a C4 channel's (TRPV1, -10 dB) own "
        "operators 0.97-0.98, those of C3, C6, C8 and D4 0.62-0.76; a D7 ring's own 0.97-0.99, C6's "
        "and D8's 0.44-0.79",
    )
    symmetry_box_px: int = _tuned(
        32,
        "px",
        "the symmetry check scores the half maps Fourier-cropped to this box (from the working box): "
        "the band the search's map is sure of, where a wrong operator loses the map's shape",
        "C4 channel at 64 px: wrong operators 0.82 of the halves' agreement at 24 px, 0.79 at 32 px; "
        "true ones 0.97 at both",
    )

    # --- the continuous latent model (--latent-dim)
    latent_iterations: int = _tuned(
        12,
        "EM passes",
        "passes of the latent model's EM over the particles; the basis's prior is on from the pass "
        "after the half",
        "on the 20-state adenylate kinase motion (10,000 particles, -10 dB) the residual power settled "
        "within 1e-4 of itself by the 7th pass; on a one-structure set the unsupported directions' "
        "determined share fell to 0.02-0.03 after 6 passes with the prior, 0.20 after 4 "
        "(tests/test_latent.py)",
    )
    latent_ridge: float = _tuned(
        1e-3,
        "fraction of the mean CTF^2 weight",
        "the latent model's M step ridge per voxel, on the mean and the basis (a guard for voxels few "
        "images reach; the basis has its own prior)",
        "not tuned: a guard",
    )
    latent_min_determined: float = _tuned(
        0.1,
        "share of a dimension's spread",
        "a latent dimension whose particles' positions the images determine to less than this share "
        "of its spread (the variance of its posterior means, z in standard deviations) is said to "
        "show no change the data support",
        "one-structure sets: 0.02 and 0.02 (10,000 adenylate kinase particles, -10 dB, 64 px), 0.03 "
        "and 0.02 (600 ribosomes, 0 dB, 32 px); sets that change: 0.97 and 0.90 (the 20-state motion), "
        "0.96 for the one direction of two conformations (docs/results.md#continuous-heterogeneity)",
    )

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> Policy:
        """A policy from ``{name: value}`` (the rest default); an unknown name or a value of the
        wrong type is a :class:`cryoai.errors.InputError` naming ``source``.
        """
        from .errors import InputError

        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"{source}: unknown policy option(s) {', '.join(unknown)}")
        typed = {}
        for name, value in values.items():
            kind = type(known[name].default)
            try:
                typed[name] = kind(value)
            except (TypeError, ValueError):
                raise InputError(f"{source}: policy option {name} must be a number (got {value!r})") from None
        return cls(**typed)

    def to_dict(self) -> dict:
        """The policy as ``{name: value}``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def describe(name: str) -> str:
    """One sentence of help for the policy field ``name``: its meaning, unit and evidence."""
    f = next(f for f in fields(Policy) if f.name == name)
    return f"{f.metadata['help']} ({f.metadata['unit']}; measured: {f.metadata['measured']})"


__all__ = ["Policy", "describe"]
