"""REINFORCE++ (Hu, arXiv 2501.03262; OpenRLHF) and REINFORCE++-baseline.

No critic, no groups needed: the per-token reward is the sequence reward on the last token
minus beta * k1(pi_old, pi_ref) at every token (beta = 0.01), the return is its reverse
cumulative sum (gamma = 1), and the advantage is the return whitened over every token of the
global batch. The -baseline variant subtracts the group's mean reward first (rollout.n > 1).
Loss: PPO clip 0.2, token-mean.

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=reinforce_pp
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import common
from algorithms.advantages import reinforce_pp_advantages
from algorithms.base import PolicyGradientConfig, register_algorithm
from algorithms.losses import kl_penalty
from core.config import at_least
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class ReinforcePPConfig(PolicyGradientConfig):
    name: str = "reinforce_pp"
    reward_kl_coef: float = 0.01
    """beta of the k1 KL penalty in the per-token reward (0 builds no reference model)."""
    baseline: bool = False
    """REINFORCE++-baseline: subtract the group mean reward first."""

    def __post_init__(self) -> None:
        at_least(self, 0, "reward_kl_coef")


def advantages(rewards_B: torch.Tensor, mask_BR: torch.Tensor, group_ids_B: torch.Tensor,
               *kl_inputs: torch.Tensor, kl_coef: float, baseline: bool) -> torch.Tensor:
    kl_BR = kl_penalty(kl_inputs[0], kl_inputs[1], "k1") if kl_inputs else None
    return reinforce_pp_advantages(rewards_B, mask_BR, kl_BR=kl_BR, kl_coef=kl_coef,
                                   group_ids_B=group_ids_B, baseline=baseline)[0]


@register_algorithm("reinforce_pp", ReinforcePPConfig)
def build_graph(cfg: ReinforcePPConfig) -> Graph:
    ref_before, ref_after = common.reference_nodes(bool(cfg.reward_kl_coef or cfg.loss.kl_coef))
    return Graph("reinforce_pp", [
        common.generate(),
        common.score(),
        common.shape(cfg.rewards),
        common.old_logp(cfg.recompute_old_logp),
        *ref_before,
        Node("advantages", advantages, ("rewards", "response_mask", "group_ids")
             + (("old_logp", "ref_logp") if cfg.reward_kl_coef else ()), ("advantages",),
             kwargs={"kl_coef": cfg.reward_kl_coef, "baseline": cfg.baseline}),
        *common.policy_update(cfg),
        *ref_after,
    ])
