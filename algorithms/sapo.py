"""SAPO: Soft Adaptive Policy Optimization (Qwen, Gao et al., arXiv 2511.20347).

A smooth, temperature-controlled gate replaces the hard clip. With r_{i,t} = pi / pi_old
(log-ratio clamped to +-20) and tau = tau_pos for A_{i,t} > 0, tau_neg otherwise,

    f(r) = sigmoid( tau (r - 1) ) * 4 / tau
    L_{i,t} = -f(r_{i,t}) A_{i,t}

so d L / d log pi = -4 sigmoid(tau (r-1)) (1 - sigmoid(tau (r-1))) r A: exactly the policy
gradient at r = 1, decaying smoothly (not to zero at a fixed edge) as r leaves 1; a larger tau
decays faster. Negative advantages get the slightly larger tau_neg = 1.05 (tau_pos = 1.0), the
paper's defaults for Qwen3-30B-A3B, because pushing a token's probability down spreads mass to
the whole vocabulary and is the less stable direction. Paper aggregation: each sequence's token
mean, averaged over sequences (`seq-mean-token-mean`); no KL.

Same formula as verl's `compute_policy_loss_sapo` (which forces seq-mean-token-mean; here the
preset's mode applies). There is no clip to count: the metric `pg_gate_weight` is the token
mean of the gradient weight 4 sigmoid (1 - sigmoid) r (1 on-policy, < 1 off-policy).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=sapo
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms.base import register_algorithm
from algorithms.grpo import GRPOConfig, GRPOLoss, grpo_graph
from algorithms.losses import (
    AggMode,
    Flags,
    PolicyLoss,
    PolicyObjective,
    clipped_log_ratio,
    register_objective,
)
from core.batch import Batch
from core.graph import Graph


def sapo_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, *,
              tau_pos: float, tau_neg: float) -> tuple[torch.Tensor, Flags]:
    """Per-token SAPO loss -f(r) A [B, R] and the gradient weight f'(r) r for metrics."""
    ratio_BR = torch.exp(clipped_log_ratio(logp_BR, old_logp_BR))
    tau_BR = torch.where(adv_BR > 0, torch.full_like(adv_BR, tau_pos), torch.full_like(adv_BR, tau_neg))
    gate_BR = torch.sigmoid(tau_BR * (ratio_BR - 1))
    loss_BR = -gate_BR * (4.0 / tau_BR) * adv_BR
    weight_BR = (4.0 * gate_BR * (1 - gate_BR) * ratio_BR).detach()
    return loss_BR, {"pg_gate_weight": weight_BR}


@register_objective("sapo")
@dataclass(kw_only=True, slots=True)
class SAPO(PolicyObjective):
    """SAPO's soft gate (module docstring)."""
    name: str = "sapo"
    tau_pos: float = 1.0
    """Gate temperature for positive advantages."""
    tau_neg: float = 1.05
    """Gate temperature for zero and negative advantages."""

    def __post_init__(self) -> None:
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ValueError(f"SAPO temperatures must be > 0, got tau_pos={self.tau_pos}, tau_neg={self.tau_neg}")

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return sapo_loss(logp_BR, old_logp_BR, adv_BR, tau_pos=self.tau_pos, tau_neg=self.tau_neg)


@dataclass(kw_only=True, slots=True)
class SAPOLoss(GRPOLoss):
    agg_mode: AggMode = "seq-mean-token-mean"
    objective: PolicyObjective = field(default_factory=SAPO)
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class SAPOConfig(GRPOConfig):
    name: str = "sapo"
    loss: SAPOLoss = field(default_factory=SAPOLoss)


@register_algorithm("sapo", SAPOConfig)
def build_graph(cfg: SAPOConfig) -> Graph:
    return grpo_graph("sapo", cfg)
