"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

Policy entropy falls because of the covariance between a token's log-probability and its
advantage: confident tokens with high advantage sharpen the policy. Both methods act on the
few tokens with the largest centred product

    Cov_{i,t} = (log pi_old(y_{i,t}) - mean log pi_old) * (A_{i,t} - mean A)

(means over every loss token of the step on every rank):

* **Clip-Cov** (`clip_cov`): among tokens with lb < Cov < ub (1 and 5), pick frac * N at random
  (frac = 2e-4, at least 1; N the step's loss tokens) and detach them: their loss term is
  dropped (value and gradient); every other token has PPO's clipped surrogate with the loss's
  eps_low / eps_high (and dual_clip, if set).
* **KL-Cov** (`kl_cov`): the top k * N tokens by Cov (k = 2e-3, at least 1) get a penalty
  beta |log r| (beta = 1) on the plain surrogate: L = -A r + beta |log(pi / pi_old)| there,
  L = -A r elsewhere; no clip (r = pi / pi_old, log r clamped to +-20).

Paper settings (Qwen2.5-7B): r = 2e-4 with [1, 5]; k = 2e-3 (2e-4 for 32B), beta = 1;
token-mean, no KL to a reference (the paper's DAPO-style base, without clip-higher here).

Departures from verl's `compute_policy_loss_clip_cov` / `_kl_cov`, for reproducibility and the
loss-scaling contract: the selection is made once per step, before the update, by a graph node
(`cov_select`), over the global batch with the step's old log-probs, and seeded (`seed` plus a
hash of the step's sampled tokens, so a resumed run draws the same tokens); verl selects within
each micro-batch with the current log-probs, so its choice changes with the micro-batch size and
the number of ranks. On the first optimizer step of a step the current policy *is* pi_old, so
the covariance is the same quantity. Clip-Cov does not first exclude tokens the PPO clip already
binds (verl does): at selection time the ratio is 1 everywhere. The metric `cov_frac` is the
share of loss tokens selected; `pg_clipfrac` keeps PPO's meaning (verl's Clip-Cov reuses the name
for the selected share); verl's config default for beta is 0.1 (its code falls back to 1.0).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=clip_cov
    ... algorithm.name=kl_cov
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from algorithms.base import register_algorithm
from algorithms.grpo import GRPOConfig, GRPOLoss, grpo_graph
from algorithms.losses import (
    AggMode,
    Flags,
    PolicyLoss,
    PolicyObjective,
    clipped_log_ratio,
    ppo_clip_flags,
    ppo_clip_loss,
    register_objective,
)
from core import dist
from core.batch import Batch, declare_field
from core.graph import Graph, Node, Result

declare_field("cov_mask", shape="B,R", doc="1 on the tokens Clip-Cov detaches or KL-Cov penalises (by covariance)")


def covariance(old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """[B, R] float64: (logp - mean logp)(A - mean A), means over every rank's loss tokens
    (collective); 0 on padding."""
    m = mask_BR.bool()
    lp_BR, a_BR = old_logp_BR.double(), adv_BR.double()
    s = dist.all_reduce_scalars({"n": float(m.sum()), "lp": float(lp_BR[m].sum()), "a": float(a_BR[m].sum())})
    n = max(s["n"], 1.0)
    cov_BR = (lp_BR - s["lp"] / n) * (a_BR - s["a"] / n)
    return torch.where(m, cov_BR, torch.zeros_like(cov_BR))


class PickRule:
    """Chooses candidates from the global list of their covariance values."""

    __slots__ = ()

    def __call__(self, cov_N: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _global_pick(values: torch.Tensor, pick: PickRule) -> torch.Tensor:
    """[n] bool over this rank's candidates: the ones `pick` chooses among every rank's
    candidates, concatenated in rank order (collective; the same choice on every rank)."""
    parts = dist.all_gather_objects(values.cpu())
    everyone = torch.cat(parts) if parts else values.cpu()
    chosen = pick(everyone)
    start = sum(len(p) for p in parts[:dist.info().rank]) if len(parts) > 1 else 0
    return chosen[start:start + len(values)].to(values.device)


@dataclass(frozen=True, slots=True)
class TopK(PickRule):
    k: int

    def __call__(self, cov_N: torch.Tensor) -> torch.Tensor:
        # Stable sort: ties go to the earlier token, the same on one process or several.
        order = torch.sort(cov_N, descending=True, stable=True).indices[:self.k]
        out = torch.zeros(len(cov_N), dtype=torch.bool)
        out[order] = True
        return out


@dataclass(frozen=True, slots=True)
class RandomK(PickRule):
    k: int
    seed: int

    def __call__(self, cov_N: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(len(cov_N), generator=torch.Generator().manual_seed(self.seed))[:self.k]
        out = torch.zeros(len(cov_N), dtype=torch.bool)
        out[perm] = True
        return out


def step_seed(seed: int, response_ids_BR: torch.Tensor, mask_BR: torch.Tensor) -> int:
    """`seed` mixed with a hash of the step's sampled tokens over every rank (collective): a
    different draw each step, the same draw when a run is resumed or re-run."""
    pos_BR = torch.arange(1, response_ids_BR.shape[1] + 1, device=response_ids_BR.device)[None]
    local = float((response_ids_BR.long() * pos_BR * mask_BR.long()).sum() % 1_000_003)
    total = int(dist.all_reduce_scalars({"h": local})["h"])
    return (seed * 1_000_003 + total) % (2**62)


def cov_select(old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, mask_BR: torch.Tensor,
               response_ids_BR: torch.Tensor, *, rule: Literal["clip", "top"], frac: float,
               low: float = 1.0, high: float = 5.0, seed: int = 0) -> Result:
    """cov_mask [B, R] (float, 1 on the selected loss tokens) for Clip-Cov ("clip": frac * N at
    random among low < Cov < high) or KL-Cov ("top": the frac * N largest); global over ranks."""
    m = mask_BR.bool()
    cov_BR = covariance(old_logp_BR, adv_BR, m)
    n_tokens = dist.all_reduce_scalars({"n": float(m.sum())})["n"]
    k = max(1, int(frac * n_tokens))
    if rule == "top":
        candidate_BR = m
        pick: PickRule = TopK(k)
    else:
        candidate_BR = m & (cov_BR > low) & (cov_BR < high)
        pick = RandomK(k, step_seed(seed, response_ids_BR, m))
    chosen = _global_pick(cov_BR[candidate_BR], pick)
    sel_BR = torch.zeros_like(m)
    sel_BR[candidate_BR] = chosen
    mean_cov = dist.all_reduce_scalars({"c": float(cov_BR[m].sum())})["c"] / max(n_tokens, 1.0)
    return Result(sel_BR.to(torch.float32), metrics={"cov/covariance_mean": mean_cov})


@dataclass(kw_only=True, slots=True)
class CovObjective(PolicyObjective):
    """What Clip-Cov and KL-Cov share: the `cov_mask` field, made by the cov_select node."""
    rule: ClassVar[Literal["clip", "top"]] = "clip"

    def inputs(self) -> tuple[str, ...]:
        return ("cov_mask",)

    def selection(self) -> dict[str, float | int | str]:
        raise NotImplementedError

    def nodes(self, mask_field: str) -> list[Node]:
        return [Node("cov_select", cov_select, ("old_logp", "advantages", mask_field, "response_ids"),
                     ("cov_mask",), kwargs={"rule": self.rule, **self.selection()})]


@register_objective("clip_cov")
@dataclass(kw_only=True, slots=True)
class ClipCov(CovObjective):
    """PPO clip, with a random few high-covariance tokens detached (module docstring)."""
    name: str = "clip_cov"
    uses_ppo_clip: ClassVar[bool] = True
    rule: ClassVar[Literal["clip", "top"]] = "clip"
    frac: float = 2e-4
    """Share of the step's loss tokens to detach (at least one)."""
    cov_low: float = 1.0
    """Candidates have cov_low < Cov < cov_high."""
    cov_high: float = 5.0
    seed: int = 0
    """Seed of the random selection (mixed with a hash of the step's tokens)."""

    def selection(self) -> dict[str, float | int | str]:
        return {"frac": self.frac, "low": self.cov_low, "high": self.cov_high, "seed": self.seed}

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        pg_BR, flags = ppo_clip_loss(logp_BR, old_logp_BR, adv_BR, eps_low=loss.eps_low, eps_high=loss.eps_high,
                                     dual_clip=loss.dual_clip)
        selected = mb.cov_mask.bool()
        out = ppo_clip_flags(flags)
        out["cov_frac"] = selected
        return torch.where(selected, torch.zeros_like(pg_BR), pg_BR), out


def kl_cov_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, selected_BR: torch.Tensor,
                *, kl_coef: float) -> torch.Tensor:
    """Per-token KL-Cov loss: -A r, plus kl_coef |log r| on the selected tokens."""
    log_r_BR = clipped_log_ratio(logp_BR, old_logp_BR)
    loss_BR = -adv_BR * torch.exp(log_r_BR)
    return torch.where(selected_BR.bool(), loss_BR + kl_coef * log_r_BR.abs(), loss_BR)


@register_objective("kl_cov")
@dataclass(kw_only=True, slots=True)
class KLCov(CovObjective):
    """The unclipped surrogate, with |log r| on the top-covariance tokens (module docstring)."""
    name: str = "kl_cov"
    rule: ClassVar[Literal["clip", "top"]] = "top"
    frac: float = 2e-3
    """k: share of the step's loss tokens penalised (at least one)."""
    kl_coef: float = 1.0
    """beta, the weight of |log(pi / pi_old)| on the selected tokens."""

    def selection(self) -> dict[str, float | int | str]:
        return {"frac": self.frac}

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        return (kl_cov_loss(logp_BR, old_logp_BR, adv_BR, mb.cov_mask, kl_coef=self.kl_coef),
                {"cov_frac": mb.cov_mask.bool()})


@dataclass(kw_only=True, slots=True)
class ClipCovLoss(GRPOLoss):
    agg_mode: AggMode = "token-mean"
    objective: PolicyObjective = field(default_factory=ClipCov)
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class ClipCovConfig(GRPOConfig):
    name: str = "clip_cov"
    loss: ClipCovLoss = field(default_factory=ClipCovLoss)


@dataclass(kw_only=True, slots=True)
class KLCovLoss(ClipCovLoss):
    objective: PolicyObjective = field(default_factory=KLCov)


@dataclass(kw_only=True, slots=True)
class KLCovConfig(GRPOConfig):
    name: str = "kl_cov"
    loss: KLCovLoss = field(default_factory=KLCovLoss)


@register_algorithm("clip_cov", ClipCovConfig)
def build_clip_cov(cfg: ClipCovConfig) -> Graph:
    return grpo_graph("clip_cov", cfg)


@register_algorithm("kl_cov", KLCovConfig)
def build_kl_cov(cfg: KLCovConfig) -> Graph:
    return grpo_graph("kl_cov", cfg)
