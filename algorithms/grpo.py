"""GRPO (DeepSeekMath, arXiv 2402.03300; as used by DeepSeek-R1-Zero).

For each prompt, sample a group of G responses (rollout.n) and score them; the advantage of
response i is its reward normalised within the group, A_i = (r_i - mean_g) / (std_g + 1e-6)
(unbiased std), shared by all its tokens. The policy minimises the PPO-clip surrogate

    L = agg_{i,t} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high))
        + beta * agg_{i,t} KL_k3(pi || pi_ref)

with rho = pi / pi_old, the paper's `seq-mean-token-mean` aggregation and beta = 0.001 (R1;
DeepSeekMath used 0.04) by default. beta = 0 builds no reference model. No departure from the
paper by default; every term is a config switch (algorithm.loss.*, algorithm.norm_std, ...).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml
"""
from __future__ import annotations

from dataclasses import dataclass, field

from algorithms import common
from algorithms.advantages import grpo_advantages
from algorithms.base import PolicyGradientConfig, register_algorithm
from algorithms.losses import AggMode, PolicyLoss
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class GRPOLoss(PolicyLoss):
    agg_mode: AggMode = "seq-mean-token-mean"
    kl_coef: float = 0.001


@dataclass(kw_only=True, slots=True)
class GRPOConfig(PolicyGradientConfig):
    name: str = "grpo"
    loss: GRPOLoss = field(default_factory=GRPOLoss)
    norm_std: bool = True
    """Divide by the group's std (False: Dr. GRPO's r - mean_g)."""


def grpo_graph(name: str, c: GRPOConfig, *, sampling: list[Node] | None = None) -> Graph:
    """The GRPO family's graph; Dr. GRPO and DAPO reuse it with their own configs. `sampling`
    replaces the generate + score nodes (DAPO's dynamic sampling)."""
    ref_before, ref_after = common.reference_nodes(bool(c.loss.kl_coef))
    return Graph(name, [
        *(sampling or [common.generate(), common.score()]),
        common.shape(c.rewards),
        common.old_logp(c.recompute_old_logp),
        *ref_before,
        Node("advantages", grpo_advantages, ("rewards", "group_ids", "response_mask"), ("advantages",),
             kwargs={"norm_std": c.norm_std}),
        *common.policy_update(c),
        *ref_after,
    ])


@register_algorithm("grpo", GRPOConfig)
def build_graph(cfg: GRPOConfig) -> Graph:
    return grpo_graph("grpo", cfg)
