"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740).

Each of the k responses to a prompt is baselined by the mean reward of the *other* k - 1:

    A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j  =  k / (k - 1) * (r_i - mean_g)

shared by all tokens of response i, with the PPO-clip loss (eps 0.2, token-mean); k = rollout.n
(2 to 4 in the paper). T1 (arXiv 2501.11651) uses RLOO with an entropy bonus
(loss.entropy_coef) and a dynamic KL anchor (loss.kl_coef > 0 and reference.anchor).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=rloo
"""
from __future__ import annotations

from dataclasses import dataclass

from algorithms import common
from algorithms.advantages import rloo_advantages
from algorithms.base import PolicyGradientConfig, register_algorithm
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class RLOOConfig(PolicyGradientConfig):
    name: str = "rloo"


@register_algorithm("rloo", RLOOConfig)
def build_graph(cfg: RLOOConfig) -> Graph:
    ref_before, ref_after = common.reference_nodes(bool(cfg.loss.kl_coef))
    return Graph("rloo", [
        common.generate(),
        common.score(),
        common.shape(cfg.rewards),
        common.old_logp(cfg.recompute_old_logp),
        *ref_before,
        Node("advantages", rloo_advantages, ("rewards", "group_ids", "response_mask"), ("advantages",)),
        *common.policy_update(cfg),
        *ref_after,
    ])
