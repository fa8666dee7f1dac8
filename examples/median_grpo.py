"""A user-defined algorithm, outside the packages: GRPO with a median baseline.

    A_i = (r_i - median_g) * scale

The median is robust to a few outlier rewards in a group (e.g. a shaped bonus gone wild).
Everything else is GRPO's: sampling, scoring, the PPO-clip loss and its settings
(algorithm.grpo.*). Its own parameters come from `algorithm.extra`, checked strictly against
a dataclass. Select it by import path, from the repository root:

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml \\
        algorithm.name=examples.median_grpo:build_graph algorithm.extra.scale=2.0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import common
from core.config import from_dict
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class MedianConfig:
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


def build_graph(job) -> Graph:
    mine = from_dict(MedianConfig, job.algorithm.extra, source="algorithm.extra")
    grpo = job.algorithm.grpo
    loss = common.resolve_loss(grpo.loss, job)
    return Graph("median_grpo", [
        common.generate(),
        common.score(),
        common.shape(grpo.rewards, job),
        common.old_logp(),
        *([common.ref_logp()] if loss.kl_coef else []),
        Node("advantages", median_advantages, ("rewards", "group_ids", "response_mask"),
             ("advantages",), kwargs={"scale": mine.scale}),
        common.update_actor(loss),
    ])
