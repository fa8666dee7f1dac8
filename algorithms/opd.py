"""On-policy distillation (OPD): the student samples, a frozen teacher grades every token.

The learning signal is the per-token reverse KL to a teacher pi_T, estimated on the student's
own samples (Agarwal et al., GKD, arXiv 2306.13649; Thinking Machines' "On-Policy Distillation",
2025; Qwen3's distillation stage). For sampled token y_{i,t},

    A_{i,t} = -beta (log pi_old(y_{i,t}) - log pi_T(y_{i,t}))  +  gamma A^GRPO_i

the first term the negative reverse-KL estimate k1 at that token (distill_coef beta = 1; each
token's advantage is its own term only, discount 0, as Thinking Machines), the second GRPO's
group-normalised reward advantage (reward_coef gamma = 0: distillation alone; > 0 adds the
reward). The advantage feeds the preset's objective (PPO clip by default, token-mean, no KL
term: the KL *is* the signal), so the expected gradient is that of -KL(pi || pi_T) (plus the
reward's). The teacher is the reference role serving another model folder,
`reference.model_path` (same tokenizer; the builder loads it in the reference's place); left
unset, the reference is the initial policy and the signal starts at 0.

Logged: `opd/reverse_kl`, the token mean of log pi_old - log pi_T over the global batch.

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=opd \
        reference.model_path=<teacher folder>
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms import common
from algorithms.advantages import grpo_advantages
from algorithms.base import register_algorithm
from algorithms.grpo import GRPOConfig, GRPOLoss
from algorithms.losses import AggMode
from core import dist
from core.graph import Graph, Node, Result


@dataclass(kw_only=True, slots=True)
class OPDLoss(GRPOLoss):
    agg_mode: AggMode = "token-mean"
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class OPDConfig(GRPOConfig):
    name: str = "opd"
    loss: OPDLoss = field(default_factory=OPDLoss)
    distill_coef: float = 1.0
    """beta: weight of the per-token negative reverse KL to the teacher in the advantage."""
    reward_coef: float = 0.0
    """gamma: weight of GRPO's reward advantage added to it (0: distillation alone)."""


def opd_advantages(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, mask_BR: torch.Tensor,
                   old_logp_BR: torch.Tensor, ref_logp_BR: torch.Tensor, *, distill_coef: float,
                   reward_coef: float, norm_std: bool) -> Result:
    """[B, R] advantages -beta (log pi_old - log pi_T) + gamma A^GRPO, 0 on padding, and the
    global token-mean reverse KL (collective)."""
    m = mask_BR.bool()
    rkl_BR = old_logp_BR.float() - ref_logp_BR.float()
    rkl_BR = torch.where(m, rkl_BR, torch.zeros_like(rkl_BR))
    adv_BR = -distill_coef * rkl_BR
    if reward_coef:
        adv_BR = adv_BR + reward_coef * grpo_advantages(rewards_B, group_ids_B, mask_BR, norm_std=norm_std)
    sums = dist.all_reduce_scalars({"kl": float(rkl_BR.double().sum()), "n": float(m.sum())})
    return Result(adv_BR, metrics={"opd/reverse_kl": sums["kl"] / max(sums["n"], 1.0)})


@register_algorithm("opd", OPDConfig)
def build_graph(cfg: OPDConfig) -> Graph:
    ref_before, ref_after = common.reference_nodes(True)
    return Graph("opd", [
        common.generate(),
        common.score(),
        common.shape(cfg.rewards),
        common.old_logp(cfg.recompute_old_logp),
        *ref_before,
        Node("advantages", opd_advantages, ("rewards", "group_ids", "response_mask", "old_logp", "ref_logp"),
             ("advantages",), kwargs={"distill_coef": cfg.distill_coef, "reward_coef": cfg.reward_coef,
                                      "norm_std": cfg.norm_std}),
        *common.policy_update(cfg),
        *ref_after,
    ])
