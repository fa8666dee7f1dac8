"""The `algorithm:` section of a job: which algorithm runs, and each one's own config.

Every built-in algorithm has a section with its paper's defaults, so switching
`algorithm.name` switches defaults too; a YAML file sets only what it changes, e.g.

    algorithm:
      name: dapo
      dapo: {max_gen_rounds: 5, loss: {eps_high: 0.3}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from algorithms import drgrpo, orz
from algorithms.dapo import DAPOConfig
from algorithms.grpo import GRPOConfig
from algorithms.ppo import PPOConfig
from algorithms.reinforce_pp import ReinforcePPConfig
from algorithms.rloo import RLOOConfig
from algorithms.vapo import VAPOConfig


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    name: str = "grpo"
    """grpo | drgrpo | dapo | ppo | orz | vapo | reinforce_pp | rloo, or "package.module:function"."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    drgrpo: GRPOConfig = field(default_factory=drgrpo.default_config)
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    orz: PPOConfig = field(default_factory=orz.default_config)
    vapo: VAPOConfig = field(default_factory=VAPOConfig)
    reinforce_pp: ReinforcePPConfig = field(default_factory=ReinforcePPConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form parameters for user-defined algorithms."""
