"""The records the default run's stages return: what each decided, its figures, its warnings.

Every stage returns a :class:`StageRecord` (or a subclass with its results). ``figures`` is the
stage's line of ``train_log.jsonl`` (``{"stage": name, ...}``), ``said`` the sentences the run
prints for it, ``warnings`` what it warns about (also in ``outputs.json``). The stage functions
print nothing of their own decisions: :func:`cryoai.pipeline.run.run_default` words and logs
their records, so a notebook gets the same records without a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..physics.poses import Poses
from ..reconstruction.latent import LatentModel
from ..reconstruction.particle_scores import ParticleScores
from ..reconstruction.pose_search import SubsetSearch
from ..reconstruction.regularised import Reconstruction


@dataclass(frozen=True)
class StageRecord:
    """What a stage decided and measured.

    Attributes
    ----------
    stage : its name (``train_log.jsonl``'s ``stage``).
    figures : its log record (JSON-able values), ``stage`` included.
    said : sentences for the terminal and the log, in order.
    warnings : sentences the run warns with (stderr, ``outputs.json``).
    """

    stage: str
    figures: dict = field(default_factory=dict)
    said: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkingBoxRecord(StageRecord):
    """The box the search works at: ``particles``, the run's particles Fourier-cropped to it
    (their own scale, noise model and coefficient layout).
    """

    particles: Particles | None = None


@dataclass(frozen=True)
class MapRecord:
    """One map of a run: the run's own (the particles kept), or one of its classes or
    conformations. A run's maps are a list of these, so that several maps (``--classes K``,
    heterogeneity) and a point group (``symmetry``) are values, not branches.

    Attributes
    ----------
    name : "map" (the run's), "class_001", ...
    volume : (N, N, N) float32, the map (real space, the images' scale).
    half_maps : its two half maps, or None.
    particles : (n,) int, the rows of the particles it is made of.
    resolution_px : where its half maps' FSC drops below 0.143 (period, px; NaN: no half maps).
    symmetry : its point group ("C1": none).
    file : where the run wrote it (relative to the run directory), or "".
    """

    name: str
    volume: np.ndarray
    half_maps: tuple[np.ndarray, np.ndarray] | None
    particles: np.ndarray
    resolution_px: float = float("nan")
    symmetry: str = "C1"
    file: str = ""


@dataclass(frozen=True)
class AttemptFigures:
    """One attempt of the search, as the retry policy sees it.

    Attributes
    ----------
    attempt : 1, 2, ...
    start : "blob", "classes" or "map".
    explained : the share of the subset's signal its map explains (NaN: unknown).
    views_scf : the SCF* of its subset's views.
    """

    attempt: int
    start: str
    explained: float
    views_scf: float


@dataclass(frozen=True)
class NoiseRecord(StageRecord):
    """The noise stage: the noise model the images are whitened by (None: not whitened), and
    whether the images hold no measurable noise.
    """

    noise: object | None = None  # cryoai.data.noise.NoiseModel
    noise_free: bool = False


@dataclass(frozen=True)
class RetryDecision:
    """The policy's verdict on one attempt of the search.

    Attributes
    ----------
    keep : the attempt replaces the best so far.
    again : the search runs again.
    next_start : the next attempt's start ("blob", "classes" or "map").
    said : why (None: nothing to say).
    """

    keep: bool
    again: bool
    next_start: str
    said: str | None = None


@dataclass(frozen=True)
class SearchRecord(StageRecord):
    """The search stage: the kept attempt's map and subset poses (``found``), every attempt's
    figures, and which was kept.
    """

    found: SubsetSearch | None = None
    attempts: tuple[AttemptFigures, ...] = ()
    kept_attempt: int = 0
    explained: float = float("nan")
    contrast_inverted: bool = False  # the run goes on with the images' sign flipped
    particles: Particles | None = None  # the particles as the run goes on (the sign flipped or not)


@dataclass(frozen=True)
class ViewsRecord(StageRecord):
    """The view-balancing stage: the subset's search, its poses refined or as they were."""

    found: SubsetSearch | None = None
    balanced: bool = False


@dataclass(frozen=True)
class SymmetryRecord(StageRecord):
    """The symmetry stage (``--sym``): the group imposed from here on, the frame it was found in,
    and the subset's search turned into that frame.

    Attributes
    ----------
    found : the subset's search, its poses in the group's standard frame and its map
        symmetrised (as it was where no group is imposed).
    imposed : the group's RELION name ("C1": none imposed).
    operators : (G, 3, 3) the imposed group's rotations, or None (C1).
    rotation : (3, 3) from the search's frame to the standard frame, or None.
    """

    found: SubsetSearch | None = None
    imposed: str = "C1"
    operators: torch.Tensor | None = None
    rotation: torch.Tensor | None = None


@dataclass(frozen=True)
class EncoderRecord(StageRecord):
    """The pose encoder stage: the encoder (None: not trained), its check, whether it is used."""

    encoder: torch.nn.Module | None = None
    check: dict | None = None
    used: bool = False


@dataclass(frozen=True)
class PosesRecord(StageRecord):
    """A stage that gives every particle a pose (the assignment)."""

    poses: Poses | None = None


@dataclass(frozen=True)
class ReconstructionRecord(StageRecord):
    """The regularised reconstruction (after the junk calls): the map of the particles kept."""

    reconstruction: Reconstruction | None = None


@dataclass(frozen=True)
class JunkRecord(StageRecord):
    """The junk stage: the poses after the second look, who is kept, and the scores."""

    poses: Poses | None = None
    kept: np.ndarray | None = None
    scores: ParticleScores | None = None
    distance: np.ndarray | None = None
    reconstruction: Reconstruction | None = None


@dataclass(frozen=True)
class ClassesRecord(StageRecord):
    """The 3D classes: each particle's class (0 = the largest), its probability, per class
    figures, and the classes' maps (largest first; not kept in checkpoints).
    """

    classes: np.ndarray | None = None
    probability: np.ndarray | None = None
    info: tuple[dict, ...] = ()
    maps: tuple[MapRecord, ...] = ()
    poses: Poses | None = None  # each particle's pose against its class's map (--class-poses)


@dataclass(frozen=True)
class LatentRecord(StageRecord):
    """The continuous latent model (``--latent-dim``): the fitted model (every particle's latent
    vector in ``model.z``) and the consensus Fourier map that stands beyond its band.
    """

    model: LatentModel | None = None
    background: torch.Tensor | None = None


@dataclass
class RunResult:
    """What :func:`cryoai.pipeline.run_default` returns.

    Attributes
    ----------
    poses : every particle's pose (None: the paper's amortized run, whose encoder predicts them
        into ``poses.star``).
    volume : the map, (N, N, N) float32.
    stages : every stage's record, in the order they ran.
    outputs : the paths and figures of ``outputs.json``.
    warnings : every warning of the run.
    kept : (n,) bool, the particles not called junk (None: the junk stage did not run).
    classes : (n,) int, each particle's 3D class (None: no classes).
    maps : the run's maps: its own first (``volume``, with the reconstruction's half maps),
        then one per 3D class.
    """

    poses: Poses | None
    volume: np.ndarray
    stages: list[StageRecord]
    outputs: dict
    warnings: list[str]
    kept: np.ndarray | None = None
    classes: np.ndarray | None = None
    maps: list[MapRecord] = field(default_factory=list)

    def stage(self, name: str) -> StageRecord | None:
        """The last record of the stage ``name`` (None: it did not run)."""
        found = [r for r in self.stages if r.stage == name]
        return found[-1] if found else None


@dataclass(frozen=True)
class Particles:
    """The run's particles as its stages read them: the table, the data set (whitened by the
    noise model once measured), the coefficient layout and the device.
    """

    table: object  # cryoai.io.particles.ParticleTable
    dataset: object  # cryoai.data.dataset.ParticleDataset
    formation: object  # cryoai.models.image_formation.ImageFormation
    device: torch.device

    @property
    def box_px(self) -> int:
        """The box size."""
        return self.table.box_px

    @property
    def pixel_size_a(self) -> float:
        """The pixel size, Angstrom."""
        return self.table.median_pixel_size_a()

    @property
    def source(self) -> str:
        """The particle file's name, for messages."""
        return str(self.table.source_path or "the particles")

    def spectra(self):
        """The particles' spectra and CTFs on the device (:class:`cryoai.reconstruction.ParticleSpectra`)."""
        from ..reconstruction import ParticleSpectra

        return ParticleSpectra(self.dataset, self.formation, self.device)
