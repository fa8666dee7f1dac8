"""GMPO: Geometric-Mean Policy Optimization (Zhao et al., arXiv 2507.20673).

GRPO maximises the arithmetic mean of token-level ratio-weighted advantages, so one outlier
ratio moves the whole sequence; GMPO maximises their geometric mean, clipped token by token in
log space. With l_{i,t} = log pi(y_{i,t}) - log pi_old(y_{i,t}) (clamped to +-20),
sgn = sign(A_i) and A_i the mean advantage over i's loss tokens,

    l~_{i,t} = sgn * min( sgn l_{i,t}, sgn clip(l_{i,t}, -eps_low, eps_high) )   (the pessimistic side)
    L_i      = -A_i exp( (1/|y_i|) sum_t l~_{i,t} )                              (1/|y_i|: loss tokens)

i.e. -A_i (prod_t min(r_t, clip(r_t, e^-eps_low, e^eps_high)) ...)^{1/|y_i|} for A_i > 0 (max for
A_i < 0), broadcast over i's tokens. Paper defaults: the wider range (e^-0.4, e^0.4) in ratio
space (eps_low = eps_high = 0.4 in log space), the objective a mean over sequences
(`seq-mean-token-mean`, exactly 1/G sum_i L_i here), no KL.

Same numerics as verl's `compute_policy_loss_geo_mean` (which adds 1e-8 to the length and
ignores the aggregation mode). Departures: the clamp of l to +-20 (verl leaves it commented
out); metrics: `pg_clipfrac` counts tokens where the clip *binds* (A > 0 and l > eps_high, or
A < 0 and l < -eps_low), as verl's pg_clipfrac does for PPO, split into `pg_clipfrac_ratio_high`
/ `_ratio_low`; verl's GMPO counts every token outside the range and names the A < 0 part
`pg_clipfrac_lower`, which for PPO means the dual clip. Rollout-correction IS weights multiply
the per-token loss (the arithmetic token mean under seq-mean-token-mean; verl takes their
geometric mean).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=gmpo
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
    seq_mean,
)
from core.batch import Batch
from core.graph import Graph


def gmpo_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, mask_BR: torch.Tensor, *,
              eps_low: float, eps_high: float) -> tuple[torch.Tensor, Flags]:
    """Per-token GMPO loss [B, R] (the sequence's value on each of its tokens) and clip indicators."""
    log_r_BR = clipped_log_ratio(logp_BR, old_logp_BR)
    adv_B = seq_mean(adv_BR, mask_BR)
    sgn_BR = torch.sign(adv_B)[:, None].expand_as(log_r_BR)
    pessimistic_BR = sgn_BR * torch.minimum(sgn_BR * log_r_BR, sgn_BR * log_r_BR.clamp(-eps_low, eps_high))
    loss_B = -adv_B * torch.exp(seq_mean(pessimistic_BR, mask_BR))
    high = (sgn_BR > 0) & (log_r_BR.detach() > eps_high)
    low = (sgn_BR < 0) & (log_r_BR.detach() < -eps_low)
    flags = {"pg_clipfrac": high | low, "pg_clipfrac_ratio_high": high, "pg_clipfrac_ratio_low": low}
    return loss_B[:, None].expand_as(logp_BR), flags


@register_objective("gmpo")
@dataclass(kw_only=True, slots=True)
class GMPO(PolicyObjective):
    """GMPO's geometric mean of token ratios, clipped in log space (module docstring)."""
    name: str = "gmpo"
    eps_low: float = 0.4
    """Log-space clip below 0 (ratio e^-0.4 ~ 0.67)."""
    eps_high: float = 0.4
    """Log-space clip above 0 (ratio e^0.4 ~ 1.49)."""

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return gmpo_loss(logp_BR, old_logp_BR, adv_BR, mask_BR, eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(kw_only=True, slots=True)
class GMPOLoss(GRPOLoss):
    agg_mode: AggMode = "seq-mean-token-mean"
    objective: PolicyObjective = field(default_factory=GMPO)
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class GMPOConfig(GRPOConfig):
    name: str = "gmpo"
    loss: GMPOLoss = field(default_factory=GMPOLoss)


@register_algorithm("gmpo", GMPOConfig)
def build_graph(cfg: GMPOConfig) -> Graph:
    return grpo_graph("gmpo", cfg)
