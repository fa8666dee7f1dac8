"""Algorithms: pure advantage/loss functions and one graph-building module per algorithm."""
from algorithms import dapo, drgrpo, grpo, orz, ppo, reinforce_pp, rloo, vapo  # noqa: F401  (register)
from algorithms.base import ALGORITHMS, AlgorithmConfig, get_algorithm, register_algorithm  # noqa: F401
