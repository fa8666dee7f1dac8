"""Open-Reasoner-Zero preset (Hu et al., arXiv 2503.24290; playground/orz_7b_ppo.py).

Vanilla PPO with a critic and GAE at gamma = lambda = 1, so A_t = R - V_t (return minus value),
no KL term at all, PPO clip 0.2, seq-mean-token-mean, and the simplest rule reward: 1 iff the
answer is correct *and* the response ended (a response cut by the budget gets 0). The paper's
learning rates are actor 1e-6, critic 5e-6 (configs/orz.yaml).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=orz
"""
from __future__ import annotations

from dataclasses import dataclass, field

from algorithms.base import register_algorithm
from algorithms.losses import AggMode, PolicyLoss
from algorithms.ppo import PPOConfig, ppo_graph
from algorithms.shaping import RewardShaping
from core.graph import Graph


@dataclass(kw_only=True, slots=True)
class ORZLoss(PolicyLoss):
    agg_mode: AggMode = "seq-mean-token-mean"


@dataclass(kw_only=True, slots=True)
class ORZRewards(RewardShaping):
    truncated: float | None = 0.0


@dataclass(kw_only=True, slots=True)
class ORZConfig(PPOConfig):
    name: str = "orz"
    loss: ORZLoss = field(default_factory=ORZLoss)
    rewards: ORZRewards = field(default_factory=ORZRewards)
    lam: float = 1.0


@register_algorithm("orz", ORZConfig)
def build_graph(cfg: ORZConfig) -> Graph:
    return ppo_graph("orz", cfg)
