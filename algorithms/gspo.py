"""GSPO: Group Sequence Policy Optimization (Qwen, Zheng et al., arXiv 2507.18071), and GSPO-token.

GRPO's group-normalised advantages with the importance ratio and the clip moved from tokens to
the sequence. With |y_i| the number of loss tokens of response i and the per-token log-ratio
l_{i,t} = log pi(y_{i,t}) - log pi_old(y_{i,t}) (clamped to +-20),

    s_i = exp( (1/|y_i|) sum_t l_{i,t} )                     (length-normalised sequence ratio)
    L_i = max( -A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high) ),  eps_low 3e-4, eps_high 4e-4

and the gradient flows into every token of y_i through s_i. `gspo_token` is the paper's
GSPO-token: the token-level ratio with the sequence's value,

    s_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})],   L_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, ...))

so d L_{i,t} / d log pi(y_{i,t}) = -A_{i,t} s_i when unclipped: each token gets its own advantage
while the clip decision is the sequence's. With one advantage per sequence (GRPO) the two have
the same value and gradient (paper, eq. 11-13). Paper defaults: `seq-mean-token-mean` (the
objective is 1/G sum_i L_i), no KL; the small ranges 3e-4 / 4e-4 (sequence ratios stay near 1).

Departures from verl's `compute_policy_loss_gspo` (which implements GSPO-token only): the
length is the number of *loss* tokens (so an IcePop mask also removes a token from s_i); the
token log-ratio is clamped to +-20 (verl clamps the log of s_{i,t} at 10 from above only);
the aggregation mode is the preset's (default seq-mean-token-mean, verl forces it).
`pg_clipfrac` is the share of loss tokens in sequences whose clip binds (verl: the same test,
token by token, under its name), split into `pg_clipfrac_ratio_high` / `_ratio_low`.

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=gspo
    ... algorithm.name=gspo_token            (or any preset with algorithm.loss.objective=gspo)
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


def sequence_log_ratio(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """[B]: log s_i = mean over i's loss tokens of log(pi / pi_old), each clamped to +-20."""
    return seq_mean(clipped_log_ratio(logp_BR, old_logp_BR), mask_BR)


def gspo_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, mask_BR: torch.Tensor, *,
              eps_low: float, eps_high: float, token_level: bool = False) -> tuple[torch.Tensor, Flags]:
    """Per-token GSPO loss [B, R] (`token_level`: GSPO-token) and its clip indicators."""
    log_s_B = sequence_log_ratio(logp_BR, old_logp_BR, mask_BR)
    if token_level:
        log_s_BR = log_s_B.detach()[:, None] + logp_BR - logp_BR.detach()
    else:
        log_s_BR = log_s_B[:, None].expand_as(logp_BR)
    s_BR = torch.exp(log_s_BR)
    loss_BR = torch.maximum(-adv_BR * s_BR, -adv_BR * s_BR.clamp(1 - eps_low, 1 + eps_high))
    high = (adv_BR > 0) & (s_BR.detach() > 1 + eps_high)
    low = (adv_BR < 0) & (s_BR.detach() < 1 - eps_low)
    return loss_BR, {"pg_clipfrac": high | low, "pg_clipfrac_ratio_high": high, "pg_clipfrac_ratio_low": low}


@register_objective("gspo")
@dataclass(kw_only=True, slots=True)
class GSPO(PolicyObjective):
    """GSPO's sequence-ratio surrogate (module docstring)."""
    name: str = "gspo"
    eps_low: float = 3e-4
    """Clip range of the sequence ratio below 1 (paper: 3e-4)."""
    eps_high: float = 4e-4
    """Clip range above 1 (paper: 4e-4)."""

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return gspo_loss(logp_BR, old_logp_BR, adv_BR, mask_BR, eps_low=self.eps_low, eps_high=self.eps_high)


@register_objective("gspo_token")
@dataclass(kw_only=True, slots=True)
class GSPOToken(GSPO):
    """GSPO-token: the sequence ratio's value, each token's own gradient (module docstring)."""
    name: str = "gspo_token"

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return gspo_loss(logp_BR, old_logp_BR, adv_BR, mask_BR, eps_low=self.eps_low, eps_high=self.eps_high,
                         token_level=True)


@dataclass(kw_only=True, slots=True)
class GSPOLoss(GRPOLoss):
    agg_mode: AggMode = "seq-mean-token-mean"
    objective: PolicyObjective = field(default_factory=GSPO)
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class GSPOConfig(GRPOConfig):
    name: str = "gspo"
    loss: GSPOLoss = field(default_factory=GSPOLoss)


@dataclass(kw_only=True, slots=True)
class GSPOTokenLoss(GSPOLoss):
    objective: PolicyObjective = field(default_factory=GSPOToken)


@dataclass(kw_only=True, slots=True)
class GSPOTokenConfig(GRPOConfig):
    name: str = "gspo_token"
    loss: GSPOTokenLoss = field(default_factory=GSPOTokenLoss)


@register_algorithm("gspo", GSPOConfig)
def build_graph(cfg: GSPOConfig) -> Graph:
    return grpo_graph("gspo", cfg)


@register_algorithm("gspo_token", GSPOTokenConfig)
def build_token_graph(cfg: GSPOTokenConfig) -> Graph:
    return grpo_graph("gspo_token", cfg)
