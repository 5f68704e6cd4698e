"""The default run as a library pipeline: stage functions with typed records in and out.

>>> from cryoai.io import load_particles                                          # doctest: +SKIP
>>> result = run_default(load_particles("particles.star"), TrainConfig(), outdir="run/")  # doctest: +SKIP
>>> result.poses, result.volume, result.stages                                      # doctest: +SKIP

- :mod:`.run`: :func:`run_default`, the stages top to bottom (what ``cryoai train`` runs);
- :mod:`.settings`: the options (:class:`cryoai.training.config.TrainConfig`) turned into each
  stage's typed settings, at one place;
- :mod:`.records`: what each stage returns;
- :mod:`.decisions`: the policy's decisions (:class:`cryoai.policy.Policy`), pure functions of
  measured figures;
- :mod:`.search`: the search (start, attempts, acceptance) and the view balancing;
- :mod:`.stages`: noise, pose encoder, assignment, reconstruction and junk, 3D classes, views.

docs/pipeline.md describes each stage, why it is there, its thresholds and its cost.
"""

from ..policy import Policy
from ..training.config import TrainConfig
from .records import RunResult, StageRecord
from .run import check_inputs, run_default

__all__ = ["Policy", "RunResult", "StageRecord", "TrainConfig", "check_inputs", "run_default"]
