"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585).

PPO's clip drops the gradient of every token whose ratio left the range, often the rare
tokens that fork a reasoning path. CISPO clips the importance-sampling *weight* instead and
keeps every token's gradient through log pi:

    r_{i,t} = pi(y_{i,t}) / pi_old(y_{i,t})        (log-ratio clamped to +-20)
    w_{i,t} = sg[ clip(r_{i,t}, 1 - eps_low, 1 + eps_high) ]
    grad L  = -agg_{i,t} w_{i,t} A_{i,t} grad log pi(y_{i,t})

with no lower bound by default (eps_low = null: the paper sets eps_low "to a large value") and
eps_high = 0.2 (verl's CISPO example; the paper tunes it). The paper's normalisation is over all
tokens of the batch: `token-mean`; no KL.

Departure from verl's `compute_policy_loss_cispo`, whose loss *value* is -w A log pi: here it is
L = -w A pi / sg[pi] (value -w A, the surrogate at the clipped weight, comparable with the other
objectives' pg_loss and independent of the absolute log-prob); the gradient is identical.
`pg_clipfrac` is the share of tokens whose weight was clipped (verl's test, r != clip(r)).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=cispo
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


def cispo_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, *,
               eps_low: float | None, eps_high: float) -> tuple[torch.Tensor, Flags]:
    """Per-token CISPO loss [B, R]: value -w A, gradient -w A d log pi, w the detached clipped ratio."""
    ratio_BR = torch.exp(clipped_log_ratio(logp_BR, old_logp_BR)).detach()
    w_BR = ratio_BR.clamp(min=None if eps_low is None else 1 - eps_low, max=1 + eps_high)
    loss_BR = -w_BR * adv_BR * torch.exp(logp_BR - logp_BR.detach())
    high, low = ratio_BR > w_BR, ratio_BR < w_BR
    return loss_BR, {"pg_clipfrac": high | low, "pg_clipfrac_ratio_high": high, "pg_clipfrac_ratio_low": low}


@register_objective("cispo")
@dataclass(kw_only=True, slots=True)
class CISPO(PolicyObjective):
    """CISPO's clipped, detached IS weight on every token's log-likelihood gradient."""
    name: str = "cispo"
    eps_low: float | None = None
    """Weight floor 1 - eps_low; null: none (MiniMax-M1)."""
    eps_high: float = 0.2
    """Weight cap 1 + eps_high."""

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return cispo_loss(logp_BR, old_logp_BR, adv_BR, eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(kw_only=True, slots=True)
class CISPOLoss(GRPOLoss):
    agg_mode: AggMode = "token-mean"
    objective: PolicyObjective = field(default_factory=CISPO)
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class CISPOConfig(GRPOConfig):
    name: str = "cispo"
    loss: CISPOLoss = field(default_factory=CISPOLoss)


@register_algorithm("cispo", CISPOConfig)
def build_graph(cfg: CISPOConfig) -> Graph:
    return grpo_graph("cispo", cfg)
