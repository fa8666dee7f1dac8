"""Algorithms: pure advantage/loss functions and one graph-building module per algorithm.

Importing the package registers every built-in algorithm and policy objective."""
from algorithms import (  # noqa: F401  (register)
    cispo,
    cov,
    dapo,
    drgrpo,
    gmpo,
    grpo,
    gspo,
    opd,
    orz,
    ppo,
    reinforce_pp,
    rloo,
    sapo,
    vapo,
)
from algorithms.base import (  # noqa: F401
    ALGORITHMS,
    AlgorithmConfig,
    get_algorithm,
    register_algorithm,
)
