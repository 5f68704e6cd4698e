"""Simulation of particle data sets from a map or an atomic model."""

from .atomic import atomic_model_to_map
from .simulator import SimulationConfig, simulate_dataset

__all__ = ["SimulationConfig", "atomic_model_to_map", "simulate_dataset"]
