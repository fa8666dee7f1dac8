"""A user-defined algorithm, outside the packages: GRPO with a median baseline.

    A_i = (r_i - median_g) * scale

The median is robust to a few outlier rewards in a group (e.g. a shaped bonus gone wild).
Everything else is GRPO's: sampling, scoring, the PPO-clip loss and its settings. Its Config,
the annotation of `build_graph`'s parameter, becomes the schema of the `algorithm:` section, as
strictly loaded as a built-in one (`algorithm.scale`, `algorithm.loss.kl_coef`, ...). Select it
by import path, from the repository root:

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml \\
        algorithm.name=examples.median_grpo:build_graph algorithm.scale=2.0
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms import common
from algorithms.base import PolicyGradientConfig
from algorithms.grpo import GRPOLoss
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class MedianConfig(PolicyGradientConfig):
    loss: GRPOLoss = field(default_factory=GRPOLoss)
    scale: float = 1.0
    """Multiplies the advantage (a learning-rate knob for the policy-gradient term)."""


def median_advantages(rewards_B: torch.Tensor, group_ids_B: torch.Tensor,
                      mask_BR: torch.Tensor, *, scale: float) -> torch.Tensor:
    """[B, R]: (r_i - median of its group) * scale on every response token."""
    adv_B = torch.zeros_like(rewards_B)
    for g in group_ids_B.unique():
        members = group_ids_B == g
        adv_B[members] = rewards_B[members] - rewards_B[members].median()
    return (scale * adv_B)[:, None] * mask_BR


def build_graph(cfg: MedianConfig) -> Graph:
    ref_before, ref_after = common.reference_nodes(bool(cfg.loss.kl_coef))
    return Graph("median_grpo", [
        common.generate(),
        common.score(),
        common.shape(cfg.rewards),
        common.old_logp(cfg.recompute_old_logp),
        *ref_before,
        Node("advantages", median_advantages, ("rewards", "group_ids", "response_mask"),
             ("advantages",), kwargs={"scale": cfg.scale}),
        *common.policy_update(cfg),
        *ref_after,
    ])
