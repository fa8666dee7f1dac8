"""Rollout correction: the inference engine's and the trainer's probabilities differ; measure and correct.

The engine samples with its own kernels and dtype, so the policy that produced the samples,
pi_rollout (`rollout_logp`, recorded by the engine per token), is not exactly the trainer's
pi_old (`old_logp`, recomputed by the actor). With rho_t = pi_old(y_t) / pi_rollout(y_t) and
d_t = log rho_t (clamped to +-20 before any exp), the `mismatch/*` metrics, logged every step
whenever both exist, are over the response tokens of the global batch:

    mismatch/kl_k1            = token-mean( -d_t )                     KL(pi_rollout || pi_old), k1
    mismatch/kl_k3            = token-mean( exp(d_t) - d_t - 1 )       KL(pi_rollout || pi_old), k3
    mismatch/ppl_ratio        = seq-mean( exp(-token-mean_i d_t) )     trainer PPL / engine PPL
    mismatch/max_abs_logratio = max_t |d_t|

(verl's `kl`, `k3_kl` and `ppl_ratio` of rollout_corr_helper.compute_offpolicy_metrics.)

Corrections, each off unless a preset or the user turns it on (`algorithm.rollout_correction.*`),
applied to the policy-gradient surrogate of every objective (decoupled mode: the objective's
ratio stays pi / pi_old, the correction bridges pi_old to pi_rollout; verl's "decoupled"):

* truncated IS (TIS), `is_level`: w_t = min(rho_t, C) per token, or w_i = min(prod_t rho_t, C)
  per sequence (Seq-TIS), C = `is_cap`; detached; multiplies each token's surrogate loss.
* masked IS / IcePop, `mask_level`: tokens (or whole sequences, by prod_t rho_t) with a ratio
  outside [mask_low, mask_high] leave the loss (and its denominators). IcePop (Ring-1T,
  arXiv 2510.18855) is mask_level=token with [0.5, 5] plus is_level=token, is_cap=5.
* geometric-mean sequence mask (Geo-RS), `geo_mask`: sequences whose exp(mean_t d_t) lies
  outside [geo_low, geo_high] leave the loss; length-invariant, unlike the product.
* bypass: `algorithm.recompute_old_logp=false` takes old_logp = rollout_logp and skips the
  actor's forward; the objective's ratio is then pi / pi_rollout itself (verl's
  bypass_ppo_clip). IS and masks need both policies, so they refuse bypass.

Logged: `rollout_correction/is_weight_mean`, `.../is_truncated_frac` (tokens or sequences whose
ratio exceeded C), `.../masked_token_frac` and `.../masked_seq_frac` (response tokens, and
sequences with at least one token, that the masks removed). Every statistic is global: sums are
all-reduced, so the values are the same on every rank and independent of the split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from algorithms.losses import seq_mean
from core import dist

Level = Literal["token", "sequence"]
SAFETY = 20.0
"""|log ratio| bound before exp (exp(20) ~ 4.9e8), as verl's SAFETY_BOUND."""


@dataclass(kw_only=True, slots=True)
class RolloutCorrection:
    """Correction of the engine/trainer mismatch (module docstring); all off by default."""
    is_level: Level | None = None
    """Truncated importance sampling: "token" (w_t = min(rho_t, C)), "sequence" (w_i = min(prod rho, C)) or null."""
    is_cap: float = 2.0
    """C, the truncation cap of the IS weight (verl's rollout_is_threshold default)."""
    mask_level: Level | None = None
    """Masked IS / IcePop: drop tokens ("token") or sequences ("sequence", by prod rho) whose
    ratio is outside [mask_low, mask_high]; null: off."""
    mask_low: float = 0.5
    mask_high: float = 5.0
    """IcePop's [alpha, beta] = [0.5, 5]."""
    geo_mask: bool = False
    """Drop sequences whose geometric-mean ratio exp(mean_t log rho_t) is outside [geo_low, geo_high]."""
    geo_low: float = 0.999
    geo_high: float = 1.001
    """verl's typical Geo-RS bounds (about +-0.1% average per-token drift)."""

    def __post_init__(self) -> None:
        if self.is_cap <= 0:
            raise ValueError(f"rollout_correction.is_cap must be > 0, got {self.is_cap}")
        for lo, hi, what in ((self.mask_low, self.mask_high, "mask"), (self.geo_low, self.geo_high, "geo")):
            if not 0 <= lo < hi:
                raise ValueError(f"rollout_correction.{what}_low/{what}_high must satisfy 0 <= low < high, "
                                 f"got [{lo}, {hi}]")

    @property
    def masks(self) -> bool:
        """Some rule removes tokens from the loss."""
        return self.mask_level is not None or self.geo_mask

    @property
    def enabled(self) -> bool:
        return self.is_level is not None or self.masks


def log_ratio(old_logp_BR: torch.Tensor, rollout_logp_BR: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """d = log(pi_old / pi_rollout) per token, clamped to +-20, 0 on padding."""
    d_BR = (old_logp_BR.float() - rollout_logp_BR.float()).clamp(-SAFETY, SAFETY)
    return torch.where(mask_BR.bool(), d_BR, torch.zeros_like(d_BR))


def mismatch_metrics(old_logp_BR: torch.Tensor, rollout_logp_BR: torch.Tensor,
                     mask_BR: torch.Tensor) -> dict[str, float]:
    """The four `mismatch/*` metrics over every rank's response tokens (collective)."""
    m = mask_BR.bool()
    d_BR = log_ratio(old_logp_BR, rollout_logp_BR, m).double()
    has_B = m.any(-1)
    sums = dist.all_reduce_scalars({
        "tokens": float(m.sum()), "seqs": float(has_B.sum()), "k1": float(-d_BR[m].sum()),
        "k3": float((torch.exp(d_BR) - d_BR - 1)[m].sum()),
        "ppl": float(torch.exp(-seq_mean(d_BR, m))[has_B].sum())})
    peak = float(d_BR.abs().max()) if d_BR.numel() else 0.0
    peak = dist.all_reduce_scalars({"max": peak}, "max")["max"]
    tokens, seqs = max(sums["tokens"], 1.0), max(sums["seqs"], 1.0)
    return {"mismatch/kl_k1": sums["k1"] / tokens, "mismatch/kl_k3": sums["k3"] / tokens,
            "mismatch/ppl_ratio": sums["ppl"] / seqs, "mismatch/max_abs_logratio": peak}


def is_weights(d_BR: torch.Tensor, mask_BR: torch.Tensor, *, level: Level, cap: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [B, R], truncated [B, R] bool): the truncated IS weight min(rho, C) per token, or the
    sequence's min(prod_t rho_t, C) on each of its tokens; 0 on padding; no gradient."""
    m = mask_BR.bool()
    if level == "token":
        rho_BR = torch.exp(d_BR)
    else:
        log_seq_B = torch.where(m, d_BR, torch.zeros_like(d_BR)).sum(-1).clamp(-SAFETY, SAFETY)
        rho_BR = torch.exp(log_seq_B)[:, None].expand_as(d_BR)
    w_BR = torch.where(m, rho_BR.clamp(max=cap), torch.zeros_like(rho_BR))
    return w_BR.detach(), m & (rho_BR > cap)


def keep_mask(d_BR: torch.Tensor, mask_BR: torch.Tensor, cfg: RolloutCorrection) -> torch.Tensor:
    """[B, R] bool: the response tokens every configured mask keeps."""
    m = mask_BR.bool()
    keep = m.clone()
    d0_BR = torch.where(m, d_BR, torch.zeros_like(d_BR))
    if cfg.mask_level == "token":
        rho_BR = torch.exp(d_BR)
        keep &= (rho_BR >= cfg.mask_low) & (rho_BR <= cfg.mask_high)
    elif cfg.mask_level == "sequence":
        rho_B = torch.exp(d0_BR.sum(-1).clamp(-SAFETY, SAFETY))
        keep &= ((rho_B >= cfg.mask_low) & (rho_B <= cfg.mask_high))[:, None]
    if cfg.geo_mask:
        geo_B = torch.exp(seq_mean(d0_BR, m))
        keep &= ((geo_B >= cfg.geo_low) & (geo_B <= cfg.geo_high))[:, None]
    return keep


def correct(old_logp_BR: torch.Tensor, rollout_logp_BR: torch.Tensor, mask_BR: torch.Tensor,
            cfg: RolloutCorrection) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
    """(IS weights [B, R] or None, kept-token mask [B, R] (same dtype as mask_BR) or None, the
    `rollout_correction/*` metrics over every rank (collective)) for the configured rules."""
    m = mask_BR.bool()
    d_BR = log_ratio(old_logp_BR, rollout_logp_BR, m)
    local: dict[str, float] = {"tokens": float(m.sum()), "seqs": float(m.any(-1).sum())}
    weights = keep = None
    if cfg.is_level is not None:
        weights, truncated = is_weights(d_BR, m, level=cfg.is_level, cap=cfg.is_cap)
        local["w"] = float(weights.double().sum())
        local["trunc"] = float(truncated.sum() if cfg.is_level == "token" else truncated.any(-1).sum())
    if cfg.masks:
        kept = keep_mask(d_BR, m, cfg)
        dropped = m & ~kept
        local["dropped"], local["dropped_seqs"] = float(dropped.sum()), float(dropped.any(-1).sum())
        keep = torch.where(kept, mask_BR, torch.zeros_like(mask_BR))
    sums = dist.all_reduce_scalars(local)
    tokens, seqs = max(sums["tokens"], 1.0), max(sums["seqs"], 1.0)
    metrics: dict[str, float] = {}
    if weights is not None:
        metrics["rollout_correction/is_weight_mean"] = sums["w"] / tokens
        metrics["rollout_correction/is_truncated_frac"] = sums["trunc"] / (tokens if cfg.is_level == "token"
                                                                            else seqs)
    if keep is not None:
        metrics["rollout_correction/masked_token_frac"] = sums["dropped"] / tokens
        metrics["rollout_correction/masked_seq_frac"] = sums["dropped_seqs"] / seqs
    return weights, keep, metrics
