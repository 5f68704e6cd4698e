"""Training configuration: one dataclass, YAML in and out, every field a command-line flag."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..data.noise import NOISE_MODELS
from ..errors import InputError
from ..io import IMAGE_PATHS
from ..physics.masks import MAP_MASK_RADIUS_FRAC
from ..policy import Policy, describe


def _opt(default, help: str, group: str = "training", *, choices: tuple | None = None, kind=None):
    """An option: its default, its sentence of help, its group in ``--help`` ("common",
    "search", "training", "outputs"), its choices, and its type where the default (None) does
    not say it.
    """
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "kind": kind})


@dataclass
class TrainConfig:
    """Every option of ``cryoai train``: its default, its help and its group are the field's
    (:func:`add_config_args` makes the flags from them). Units are in the names; None means
    "automatic".
    """

    # --- common: what most runs set
    invert_contrast: bool = _opt(
        False, "Flip the images' sign (protein dark -> bright); a run that finds its map negative "
               "flips it by itself and says so.", "common")
    max_minutes: float | None = _opt(
        None, "Wall-clock budget of the whole run, minutes: every stage stops in time and the run "
              "writes what it has.", "common", kind=float)
    seed: int = _opt(0, "Seed of every random draw (subset, half sets, search, batches).", "common")
    threads: int | None = _opt(
        None, "CPU threads of torch's operators (default: one per core); set it on a node shared with "
              "other jobs.", "common", kind=int)
    classes: int = _opt(
        1, "3D classes: K maps, each particle in the class that explains it best; 1: none.", "common")
    class_poses: bool = _opt(
        True, "With --classes: after the classification at the run's poses, every particle posed "
              "again against every class's map and classified at its own pose per class "
              "(heterogeneous refinement: several structures); off: the run's poses only.", "common")
    class_search: bool = _opt(
        True, "With --classes: the search finds the K maps together from K blobs, each image posed "
              "against every class (heterogeneous ab initio, as cryoSPARC's), and the classes start from "
              "its maps; off: one map searched, the classes made at its poses (junk classes).", "common")
    sym: str = _opt(
        "C1", "Point group of the molecule, in RELION's names and axes (C1, Cn, Dn, T, O, I1-I4): the "
              "search runs in C1, the group's axes are found in its map and checked against the data, "
              "and the map and poses come out in RELION's frame; auto: every common group is tested "
              "and the best proposed, none imposed.", "common")
    initial_map: str | None = _opt(
        None, "A map (MRC, the particles' box and pixel size, protein positive) to start the search "
              "from instead of a blob; poses and map come out in its frame.", "common", kind=str)
    search_start: str = _opt(
        "auto", "What the search starts from without --initial-map: a blob, the subset's 2D class "
                "averages, or auto (class averages when the images carry little signal each).",
        "common", choices=("auto", "blob", "classes"))
    pose_encoder: str = _opt(
        "auto", "The pose encoder after the search: auto (trained; poses the other particles where "
                "its check says it pays), off, or always (used regardless).", "common",
        choices=("auto", "off", "always"))
    noise_model: str = _opt(
        "micrograph", "Whiten the images by the noise spectrum of their background: per micrograph "
                      "(rlnMicrographName), one for the data set (global), or none (white).",
        "common", choices=NOISE_MODELS)
    particle_diameter_a: float | None = _opt(
        None, "Diameter of the soft spherical mask of the maps and of the encoder's input, Angstrom "
              "(RELION's mask diameter; sets --mask-radius-frac).", "common", kind=float)
    mask_radius_frac: float = _opt(
        MAP_MASK_RADIUS_FRAC, "Radius of that mask as a fraction of the box (0: no input mask; maps then "
                              "0.45).", "common")
    ab_initio: str = _opt(
        "search", "How poses are found: the pose search, or the paper's pure amortized training of "
                  "encoder and decoder (encoder).", choices=("search", "encoder"))
    # --- the search and the stages around it
    search_subset: int = _opt(
        5000, "Particles the search runs on (at most): past it its cost does not grow with the data set.",
        "search")
    search_rotations: int = _opt(4608, "Size of the search's SO(3) grid (4,608: about 15 degrees apart).",
                                 "search")
    search_iterations: int = _opt(100, "Stochastic EM iterations of the search, at most.", "search")
    search_batch: int = _opt(500, "Images per EM iteration of the search.", "search")
    search_stop_posterior: float = _opt(
        0.9, "Stop the EM once its band is full and the images' mean maximum posterior is this.", "search")
    search_ema: float = _opt(0.7, "Decay of the EM's running back-projection sums.", "search")
    search_retries: int = _opt(
        2, "Searches again (another seed, or from class averages) while the map explains too little of "
           "the images' signal or stays doubtful.", "search")
    initial_map_resolution_a: float = _opt(
        60.0, "Low-pass of --initial-map, Angstrom (a shape is all the search needs).", "search")
    search_resolution_a: float | None = _opt(
        None, "Finest resolution the search's EM uses, Angstrom (cryoSPARC ab initio's maximum "
              "resolution, RELION's --ini_high; sets --search-radius-end).", "search", kind=float)
    search_radius_start: float = _opt(5.0, "The EM's first band, frequency px (cycles per box).", "search")
    search_radius_end: float = _opt(10.0, "The EM's final band, frequency px (cycles per box).", "search")
    search_max_shift_px: float | None = _opt(
        None, "Largest shift the search tries, px (default 0.12 of the box).", "search", kind=float)
    search_shift_step_px: float = _opt(2.0, "Step of the search's shift grid, px.", "search")
    balance_views: bool = _opt(
        True, "Where the search's views are preferred, refine its poses against maps that weigh every "
              "direction of views alike.", "search")
    refine_method: str = _opt(
        "newton", "Local refinement of the search's poses after its EM, each round followed by a new map: "
                  "newton (quadratic model) or random (best of candidates).", "search",
        choices=("newton", "random"))
    refine_rounds: int = _opt(4, "Local refinement rounds of the search after its EM (8 suit "
                                 "--refine-method random).", "search")
    refine_candidates: int = _opt(48, "Local rotations tried per image and refinement round (random).",
                                  "search")
    refine_radius_frac: float = _opt(0.7, "The search refinement's final band, fraction of Nyquist.",
                                     "search")
    encoder_minutes: float = _opt(2.0, "Training budget of the pose encoder, minutes.", "search")
    encoder_hypotheses: int = _opt(32, "Encoder rotations scored per particle.", "search")
    assign_prune_keep: int = _opt(
        64, "The global first guess keeps each particle's best rotations of a coarse pass, then scores "
            "them fully; 0: exhaustive.", "search")
    assign_refine_method: str = _opt(
        "newton", "Local refinement of the particles posed against the map: newton (quadratic model) or "
                  "random (best of candidates).", "search", choices=("newton", "random"))
    assign_refine_rounds: int = _opt(4, "Local refinement rounds of the particles posed against the map.",
                                     "search")
    assign_refine_candidates: int = _opt(16, "Local rotations tried per particle and round (random).",
                                         "search")
    assign_refine_radius_frac: float = _opt(
        0.45, "Final band of the particles' refinement against the map, fraction of Nyquist.", "search")
    assign_radius_px: float | None = _opt(
        None, "Band of the global first guesses, frequency px (default: chosen from the images' "
              "signal, and said).", "search", kind=float)
    sort_junk: bool = _opt(
        True, "Score every particle against the map at its pose, call junk the ones far from the "
              "particles' cluster, and make the map from the rest.", "search")
    junk_passes: int = _opt(
        2, "Second looks at the junk: map from the kept particles, junk posed again, all called again "
           "(0: one call).", "search")
    junk_max_shift_frac: float = _opt(0.3, "Shift range of the junk's second look, fraction of the box.",
                                      "search")
    # --- the model and its fit
    decoder: str = _opt("voxel", "The decoder: an explicit Fourier voxel grid, or the paper's FourierNet.",
                        choices=("voxel", "fouriernet"))
    fouriernet_width: int = _opt(256, "Width of FourierNet's layers.")
    encoder_width: float = _opt(0.25, "Multiplier of the encoder's VGG channel widths (1.0: the paper's).")
    encoder_heads: int = _opt(1, "Rotation hypotheses per image of the amortized encoder (winner takes all).")
    encoder_input_px: int | None = _opt(
        None, "Fourier-crop the encoder's images to this size, px (0: the full box; default half the box "
              "from 64 px up).", kind=int)
    max_shift_a: float | None = _opt(
        None, "Bound of the encoder's predicted shifts, Angstrom (default 0.15 of the box).", kind=float)
    learn_shifts: bool = _opt(True, "The amortized encoder predicts shifts too.")
    decoder_epochs: float = _opt(2.0, "Epochs of the decoder's polish after the reconstruction.")
    decoder_max_images: int | None = _opt(
        20000, "... at most this many images (its cost flat in the number of particles).", kind=int)
    wiener_fit_steps: int = _opt(1500, "FourierNet: regression steps onto the reconstruction before the fit.")
    wiener_init: bool = _opt(
        True, "Start the decoder from the regularised reconstruction at the poses and keep its prior "
              "in the loss.")
    keep_best: bool = _opt(
        True, "Hold out some particles and end with the decoder's state that predicts them best.")
    loss: str = _opt("symmetric", "The amortized training's loss: symmetric (the paper's) or l2.",
                     choices=("symmetric", "l2"))
    max_radius_frac: float = _opt(1.0, "Highest frequency the fit uses, fraction of Nyquist.")
    batch_size: int = _opt(32, "Images per gradient step (the global batch under torchrun).")
    lr_encoder: float = _opt(1e-4, "Learning rate of the encoder.")
    lr_decoder: float = _opt(1e-4, "Learning rate of FourierNet (the voxel decoder uses --lr-voxel).")
    lr_voxel: float = _opt(0.05, "Learning rate of the voxel decoder.")
    amsgrad: bool = _opt(True, "Adam with AMSGrad.")
    grad_clip: float = _opt(1.0, "Clip the gradient's norm to this (0: no clipping).")
    latent_dim: int = _opt(
        0, "Continuous heterogeneity: D latent dimensions, every particle's map the consensus plus D "
           "basis maps weighted by its latent vector, fitted at the run's poses (written to latent.npz "
           "and the poses' STAR; cryoai analyze shows them); 0: none.", "training")
    latent_resolution_a: float | None = _opt(
        None, "With --latent-dim: the latent model's resolution limit, Angstrom (default: the "
              "consensus map's half-map FSC=0.143 resolution).", "training", kind=float)
    max_epochs: float = _opt(100.0, "Epochs of --poses and amortized runs.")
    num_workers: int = _opt(0, "Processes reading images (0: background threads in this process).")
    precision: str = _opt(
        "auto", "The encoder's arithmetic: fp32, bf16 (autocast), or auto (bf16 where the hardware has it "
                "natively).", choices=("auto", "fp32", "bf16"))
    normalize_samples: int = _opt(1000, "Images read to estimate the global intensity scale.")
    # --- outputs
    log_every: int = _opt(20, "Steps between the loss's log records.", "outputs")
    volume_every_minutes: float = _opt(2.0, "Write volume.mrc this often during the fit, minutes.", "outputs")
    checkpoint_every_minutes: float = _opt(5.0, "Write checkpoint.pt this often during the fit, minutes.",
                                           "outputs")
    tensorboard: bool = _opt(True, "Write TensorBoard logs in RUN/tensorboard.", "outputs")
    image_paths: str = _opt(
        "as_read", "How poses.star and poses.cs name the image stacks: as the input named them (so "
                   "RELION and cryoSPARC import them from the same project folder), relative to RUN, "
                   "or absolute.", "outputs", choices=IMAGE_PATHS)
    # --- the policy: every tuned threshold of the default run (cryoai.policy; expert options)
    policy: Policy = field(default_factory=Policy)

    def validate(self) -> None:
        """Raise :class:`InputError` (one line) for an option out of its range."""
        if self.decoder not in ("voxel", "fouriernet"):
            raise InputError(f"decoder must be 'voxel' or 'fouriernet' (got {self.decoder!r})")
        if self.loss not in ("symmetric", "l2"):
            raise InputError(f"loss must be 'symmetric' or 'l2' (got {self.loss!r})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"precision must be 'auto', 'fp32' or 'bf16' (got {self.precision!r})")
        if self.encoder_input_px is not None and (self.encoder_input_px < 0 or self.encoder_input_px % 2):
            raise InputError(f"encoder_input_px must be 0 (full box) or a positive even size "
                             f"(got {self.encoder_input_px})")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be positive (got {self.batch_size})")
        if not 0 < self.max_radius_frac <= 1:
            raise InputError(f"max_radius_frac must be in (0, 1] (got {self.max_radius_frac})")
        if self.ab_initio not in ("search", "encoder"):
            raise InputError(f"ab_initio must be 'search' or 'encoder' (got {self.ab_initio!r})")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1 (got {self.threads})")
        if self.pose_encoder not in ("auto", "off", "always"):
            raise InputError(f"pose_encoder must be 'auto', 'off' or 'always' (got {self.pose_encoder!r})")
        if self.encoder_minutes < 0 or self.encoder_hypotheses < 1:
            raise InputError(f"encoder_minutes must be >= 0 and encoder_hypotheses >= 1 (got "
                             f"{self.encoder_minutes}, {self.encoder_hypotheses})")
        if self.search_start not in ("auto", "blob", "classes"):
            raise InputError(f"search_start must be 'auto', 'blob' or 'classes' (got {self.search_start!r})")
        if self.initial_map_resolution_a <= 0:
            raise InputError(f"initial_map_resolution_a must be > 0 (got {self.initial_map_resolution_a})")
        if self.assign_prune_keep < 0:
            raise InputError(f"assign_prune_keep must be >= 0 (got {self.assign_prune_keep})")
        if self.assign_radius_px is not None and not self.assign_radius_px > 0:
            raise InputError(f"assign_radius_px must be > 0 (got {self.assign_radius_px})")
        if self.refine_method not in ("newton", "random"):
            raise InputError(f"refine_method must be 'newton' or 'random' (got {self.refine_method!r})")
        if self.assign_refine_method not in ("newton", "random"):
            raise InputError("assign_refine_method must be 'newton' or 'random' "
                             f"(got {self.assign_refine_method!r})")
        if self.noise_model not in NOISE_MODELS:
            raise InputError(f"noise_model must be one of {', '.join(NOISE_MODELS)} "
                             f"(got {self.noise_model!r})")
        if self.encoder_heads < 1:
            raise InputError(f"encoder_heads must be at least 1 (got {self.encoder_heads})")
        if self.latent_dim < 0:
            raise InputError(f"latent_dim must be 0 (none) or more (got {self.latent_dim})")
        if self.latent_resolution_a is not None and not self.latent_resolution_a > 0:
            raise InputError(f"latent_resolution_a must be > 0 Angstrom (got {self.latent_resolution_a})")
        if self.classes < 1:
            raise InputError(f"classes must be at least 1 (got {self.classes})")
        for name in ("particle_diameter_a", "search_resolution_a"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0 Angstrom (got {getattr(self, name)})")
        if self.junk_passes < 0 or not 0 <= self.junk_max_shift_frac <= 0.5:
            raise InputError(f"junk_passes must be >= 0 and junk_max_shift_frac in [0, 0.5] (got "
                             f"{self.junk_passes}, {self.junk_max_shift_frac})")

    def to_dict(self) -> dict:
        """The options as a plain dict (YAML, checkpoints); the policy as a nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """Options from a dict; an unknown name is an :class:`InputError` naming ``source``.

        The policy is the nested ``policy`` mapping; a policy name at the top level (the
        configs and checkpoints of runs that had ``min_explained`` and ``junk_threshold`` as
        options) is read into it.
        """
        values = dict(values)
        policy_names = {f.name for f in fields(Policy)}
        policy = values.pop("policy", None) or {}
        policy = dict(policy.to_dict() if isinstance(policy, Policy) else policy)
        for name in sorted(policy_names & set(values)):
            policy.setdefault(name, values.pop(name))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{source}: unknown option(s) {', '.join(unknown)}")
        return cls(**values, policy=Policy.from_dict(policy, source))


#: Named configurations. "paper" is the faithful cryoAI of the ECCV 2022 paper.
PRESETS: dict[str, dict] = {
    "paper": dict(ab_initio="encoder", decoder="fouriernet", fouriernet_width=256, encoder_width=1.0,
                  encoder_heads=1, encoder_input_px=0,
                  loss="symmetric", batch_size=64, lr_encoder=1e-4, lr_decoder=1e-4, amsgrad=True,
                  grad_clip=1.0, max_radius_frac=1.0),
}


def load_yaml(path: str | Path) -> dict:
    """The options of a YAML file (a mapping); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config must be a mapping of option: value")
    return values


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` to ``path`` as YAML (atomically)."""
    from ..io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: The groups of ``cryoai train --help``, in order, with their titles.
GROUPS = {
    "common": "common options",
    "search": "the search and the stages around it",
    "training": "the model and its fit",
    "outputs": "outputs",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field and per policy field, grouped, each with its sentence of
    help, its choices and its default (a flag's own default is None: keep the preset/YAML/default
    value).
    """
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for f in fields(TrainConfig):
        if f.name == "policy":
            continue
        meta = f.metadata
        group = groups[meta.get("group", "training")]
        default = f.default
        text = meta["help"] if "default" in meta["help"] else \
            f"{meta['help']} (default: {'none' if default is None else default})"
        text = text.replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", default=None,
                               action=argparse.BooleanOptionalAction, help=text)
            continue
        typ = meta.get("kind") or type(default)
        if meta.get("choices"):
            group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", type=typ, default=None,
                               choices=meta["choices"], help=text)
        else:
            group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", type=typ, default=None,
                               metavar=_metavar(f.name, typ), help=text)
    expert = parser.add_argument_group(
        "expert: the policy's thresholds (cryoai.policy; in a YAML config under policy:; "
        "docs/pipeline.md#policy)")
    for f in fields(Policy):
        typ = type(f.default)
        expert.add_argument(_flag(f.name), dest=f"policy_{f.name}", type=typ, default=None,
                            metavar=typ.__name__.upper(),
                            help=f"{describe(f.name)} (default: {f.default})".replace("%", "%%"))


def _metavar(name: str, typ) -> str:
    """The value's name in ``--help``: its unit where the option's name has one."""
    for suffix, unit in (("_a", "A"), ("_px", "PX"), ("_minutes", "MIN"), ("_frac", "FRACTION"),
                         ("_deg", "DEG")):
        if name.endswith(suffix):
            return unit
    return {str: "PATH" if name.endswith("map") else "TEXT"}.get(typ, typ.__name__.upper())


def policy_overrides(args: argparse.Namespace) -> dict:
    """The policy values given as flags."""
    return {f.name: getattr(args, f"policy_{f.name}") for f in fields(Policy)
            if getattr(args, f"policy_{f.name}", None) is not None}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- preset <- YAML file <- flags."""
    values: dict = {}
    preset = getattr(args, "preset", None)
    if preset:
        if preset not in PRESETS:
            raise InputError(f"--preset {preset}: unknown (choose from {', '.join(PRESETS)})")
        values.update(PRESETS[preset])
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            values[f.name] = v
    flags = policy_overrides(args)
    if flags:
        policy = values.get("policy") or {}
        policy = policy.to_dict() if isinstance(policy, Policy) else dict(policy)
        values["policy"] = {**policy, **flags}
    cfg = TrainConfig.from_dict(values, source=getattr(args, "config", None) or "config")
    cfg.validate()
    return cfg
