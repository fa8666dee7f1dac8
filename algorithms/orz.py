"""Open-Reasoner-Zero preset (Hu et al., arXiv 2503.24290; playground/orz_7b_ppo.py).

Vanilla PPO with a critic and GAE at gamma = lambda = 1, so A_t = R - V_t (return minus value),
no KL term at all, PPO clip 0.2, seq-mean-token-mean, and the simplest rule reward: 1 iff the
answer is correct *and* the response ended (a response cut by the budget gets 0). The paper's
learning rates are actor 1e-6, critic 5e-6 (configs/orz.yaml).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=orz
"""
from __future__ import annotations

from algorithms.base import register_algorithm
from algorithms.losses import PolicyLoss
from algorithms.ppo import PPOConfig, ppo_graph
from algorithms.shaping import RewardShaping
from core.graph import Graph


def default_config() -> PPOConfig:
    return PPOConfig(gamma=1.0, lam=1.0, rewards=RewardShaping(truncated=0.0),
                     loss=PolicyLoss(agg_mode="seq-mean-token-mean", kl_coef=0.0))


@register_algorithm("orz")
def build_graph(job) -> Graph:
    return ppo_graph("orz", job.algorithm.orz, job)
