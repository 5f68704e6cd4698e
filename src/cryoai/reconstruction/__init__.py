"""Poses and maps without a network: the mechanisms of the default run's stages.

They take every setting as an argument and decide nothing on their own: the default run
(:func:`cryoai.pipeline.run_default`) chooses, with its policy (:class:`cryoai.policy.Policy`),
which of them to run and with what (docs/pipeline.md).

- :mod:`.em`: scores of images against a map on a rotation x shift grid, the stochastic EM,
  global assignment and local refinement;
- :mod:`.pose_search`: the search stage built from them (:func:`search_subset`, the subset
  posed afresh by :func:`repose_subset`, then :func:`assign_remaining` for the other particles),
  and the
  assignment of particles against a given map (:func:`assign_poses`: new particles, a run's map);
- :mod:`.class_averages`: 2D class averages (in-plane EM) and the averages as particles, from
  which :func:`search_subset` makes its start when the images carry little signal each;
- :mod:`.amortized`: posing particles against a fixed map at a constant cost each: the
  encoder's hypotheses (or the whole grid), then local refinement (:class:`PoseAssigner`);
- :mod:`.backproject`: the one back-projection ``sum C conj(T) Y`` and ``sum C^2``;
- :mod:`.regularised`: the regularised (Wiener/MAP) solve and the half-map FSC-regularised
  reconstruction (:func:`reconstruct`);
- :mod:`.view_balance`: poses of a set whose views are preferred, refined against half maps
  that weigh every direction of views alike;
- :mod:`.particle_scores` and :mod:`.junk_sorting`: each particle scored against the map at
  its pose, the junk called, and the particles called junk posed again against the kept
  particles' map (a wider shift range) before the final call.
"""

from .amortized import AssignSettings, PoseAssigner
from .backproject import backproject
from .pose_search import (
    SearchSettings,
    SubsetSearch,
    assign_poses,
    assign_remaining,
    assign_settings,
    repose_classes,
    repose_subset,
    search_subset,
    starting_map,
)
from .regularised import Reconstruction, reconstruct
from .spectra import ParticleSpectra

__all__ = ["AssignSettings", "ParticleSpectra", "PoseAssigner", "Reconstruction", "SearchSettings",
           "SubsetSearch", "assign_poses", "assign_remaining", "assign_settings", "backproject",
           "reconstruct", "repose_classes", "repose_subset", "search_subset", "starting_map"]
