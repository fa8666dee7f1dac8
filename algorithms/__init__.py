"""Algorithms: pure advantage/loss functions and one graph-building module per algorithm."""
from algorithms import grpo  # noqa: F401  (registers the built-in algorithms)
from algorithms.base import ALGORITHMS, AlgorithmConfig, get_algorithm, register_algorithm  # noqa: F401
