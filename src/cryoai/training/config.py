"""Training configuration: one dataclass, YAML in and out, every field a command-line flag."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..data.noise import NOISE_MODELS
from ..errors import InputError
from ..physics.masks import MAP_MASK_RADIUS_FRAC
from ..policy import Policy, describe


@dataclass
class TrainConfig:
    """Every option of ``cryoai train``. Units are in the names; None means "automatic"."""

    # --- data and preprocessing
    invert_contrast: bool = False  # flip the sign of the images (particles dark -> bright)
    mask_radius_frac: float = MAP_MASK_RADIUS_FRAC  # mask radius (encoder input, maps), fraction of
    #                                                 the box; 0: no encoder-input mask, maps 0.45
    normalize_samples: int = 1000  # images used to estimate the global intensity scale
    noise_model: str = "micrograph"  # whiten by the noise spectrum measured on the images'
    #   background: per micrograph ("micrograph": rlnMicrographName, else one spectrum), one for
    #   the data set ("global"), or none ("white": the noise is assumed white)
    # --- model
    decoder: str = "voxel"  # "voxel" (explicit Fourier grid) or "fouriernet" (the paper)
    fouriernet_width: int = 256
    encoder_width: float = 0.25  # multiplier of the VGG channel widths (1.0 = the paper)
    encoder_heads: int = 1  # rotation hypotheses per image (winner takes all)
    encoder_input_px: int | None = None  # Fourier-crop the encoder's images to this size; 0: the
    #                                      full box; None: automatic (half the box from 64 px up)
    max_shift_a: float | None = None  # bound of predicted shifts; None: 0.15 * box * pixel size
    learn_shifts: bool = True
    # --- ab initio strategy
    # "search": pose-search warm start (default); "encoder": the paper's pure amortized training
    ab_initio: str = "search"
    search_subset: int = 5000  # particles used by the search (fixed: cost flat in N)
    search_rotations: int = 4608  # size of the SO(3) grid (about 15 degrees apart)
    search_iterations: int = 100  # stochastic EM iterations (at most; see search_stop_posterior)
    search_batch: int = 500  # images per EM iteration (fixed: twice as many did not rescue a failed
    #                          search at low SNR; docs/pipeline.md#search-start)
    search_stop_posterior: float = 0.9  # stop the EM once the band is full and the posterior this peaked
    search_ema: float = 0.7  # decay of the running back-projection sums
    search_retries: int = 2  # searches again from another seed when the map explains less than
    #                          policy.min_explained of the signal the images carry
    # a map (MRC, the particles' box and pixel size, protein positive as the images read after
    # --invert-contrast) to start the search from instead of a blob, low-passed to
    # initial_map_resolution_a (A); poses and map come out in its frame
    initial_map: str | None = None
    initial_map_resolution_a: float = 60.0
    # what the search starts from without --initial-map: "blob" (random poses), "classes" (a
    # map posed from the subset's 2D class averages), or "auto": classes when the images' whitened
    # signal energy is below policy.class_start_energy, else a blob, and classes if it fails or its
    # views come out preferred (docs/pipeline.md#search-start)
    search_start: str = "auto"
    search_radius_start: float = 5.0  # EM band, cycles per box
    search_radius_end: float = 10.0
    search_max_shift_px: float | None = None  # default 0.12 * box
    search_shift_step_px: float = 2.0
    # where the search's views are preferred (SCF* below policy.preferred_views_scf): its subset's
    # poses refined against
    # maps that weigh every direction of views alike, before the other particles are posed
    balance_views: bool = True
    refine_rounds: int = 8  # local refinement rounds after the EM
    refine_candidates: int = 48  # local rotations tried per image and round
    refine_radius_frac: float = 0.7  # final refinement band, fraction of Nyquist
    # --- the amortized pose stage (after the search; after the reconstruction with --poses)
    # "auto": train the pose encoder, pose the other particles with it if its check passes (else
    # the global search, said); "off": no encoder (the global search); "always": use it regardless
    pose_encoder: str = "auto"
    encoder_minutes: float = 2.0  # training budget of the pose encoder
    encoder_hypotheses: int = 32  # encoder rotations scored per particle
    # the global first guess (no encoder, or a particle it is not sure of) keeps each particle's best
    # rotations of a pass in a lower band over coarser shifts, then scores them fully; 0: exhaustive
    assign_prune_keep: int = 64
    assign_refine_method: str = "newton"  # 'newton' (quadratic model) or 'random' (best of candidates)
    assign_refine_rounds: int = 4  # local refinement rounds of the particles posed against the map
    assign_refine_candidates: int = 16  # local rotations tried per particle and round ('random')
    assign_refine_radius_frac: float = 0.45  # their final band, fraction of Nyquist
    # the band of the global first guesses (the assignment's, the junk stage's, predict-poses',
    # the 2D classes' in-plane search), frequency px; None: from the data (the search's final band,
    # or the refinement's final band where the images carry little signal within the first and
    # the second adds enough to it; the run says)
    assign_radius_px: float | None = None
    decoder_epochs: float = 2.0  # epochs of decoder training after the search
    decoder_max_images: int | None = 20000  # ... but at most this many images (cost flat in N)
    wiener_fit_steps: int = 1500  # FourierNet: regression steps (8192 points each) onto that
    #                               reconstruction before training on images
    sort_junk: bool = True  # default mode: score every particle against the map at its pose, call
    #                         junk the ones far from the particles' cluster, map from the rest
    junk_passes: int = 2  # rounds of: map from the kept particles, junk posed again (wider shifts),
    #                       every particle scored and called again (0: one call, no second look)
    junk_max_shift_frac: float = 0.3  # the second look's shift range, fraction of the box
    classes: int = 1  # 3D classes at the searched poses (classification without alignment); 1: none
    wiener_init: bool = True  # decoder with known/searched poses: start from the regularised
    #                           (half-map FSC) reconstruction and keep its prior in the loss
    keep_best: bool = True  # fixed poses: hold out some particles, and end with the decoder's
    #                        state (from its regularised start on) that predicts them best
    # --- loss
    loss: str = "symmetric"  # "symmetric" or "l2"
    max_radius_frac: float = 1.0  # highest frequency used, fraction of Nyquist
    # --- optimisation
    batch_size: int = 32
    lr_encoder: float = 1e-4
    lr_decoder: float = 1e-4  # FourierNet; the voxel decoder uses lr_voxel
    lr_voxel: float = 0.05
    amsgrad: bool = True
    grad_clip: float = 1.0
    max_epochs: float = 100.0
    max_minutes: float | None = None
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None  # CPU threads of torch's operators (None: torch's default, one per
    #                             core); set it on a node shared with other jobs
    precision: str = "auto"  # encoder arithmetic: "fp32", "bf16" (autocast), or "auto" = bf16 where
    #                          the hardware has native bf16 (CUDA; CPUs with AVX512-BF16/AMX)
    # --- outputs
    log_every: int = 20  # steps between scalar logs
    volume_every_minutes: float = 2.0  # write volume.mrc this often
    checkpoint_every_minutes: float = 5.0
    tensorboard: bool = True
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
        if self.assign_refine_method not in ("newton", "random"):
            raise InputError("assign_refine_method must be 'newton' or 'random' "
                             f"(got {self.assign_refine_method!r})")
        if self.noise_model not in NOISE_MODELS:
            raise InputError(f"noise_model must be one of {', '.join(NOISE_MODELS)} "
                             f"(got {self.noise_model!r})")
        if self.encoder_heads < 1:
            raise InputError(f"encoder_heads must be at least 1 (got {self.encoder_heads})")
        if self.classes < 1:
            raise InputError(f"classes must be at least 1 (got {self.classes})")
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


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field and per policy field (default None = keep the
    preset/YAML/default value).
    """
    group = parser.add_argument_group("training options (override --config and --preset)")
    for f in fields(TrainConfig):
        if f.name == "policy":
            continue
        default = f.default
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", default=None,
                               action=argparse.BooleanOptionalAction, help=f"(default {default})")
        else:
            typ = type(default) if default is not None else float
            if f.name in ("max_shift_a", "max_minutes", "search_max_shift_px"):
                typ = float
            elif f.name == "initial_map":
                typ = str
            elif f.name in ("encoder_input_px", "threads", "decoder_max_images"):
                typ = int
            group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", type=typ, default=None,
                               metavar=typ.__name__.upper(), help=f"(default {default})")
    expert = parser.add_argument_group(
        "expert: the policy's thresholds (cryoai.policy; YAML: under policy:; docs/pipeline.md#policy)")
    for f in fields(Policy):
        typ = type(f.default)
        expert.add_argument(_flag(f.name), dest=f"policy_{f.name}", type=typ, default=None,
                            metavar=typ.__name__.upper(),
                            help=f"{describe(f.name)} (default {f.default})".replace("%", "%%"))


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
