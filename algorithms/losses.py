"""Policy losses, KL estimators and loss aggregation: pure tensor functions.

Formulas: ALGORITHMS.md ("Loss aggregation", "KL estimators", "Policy losses"). Tensors are
[B, R] over response tokens with a 0/1 mask. Aggregation returns this micro-batch's *share* of
the optimizer step's loss, with denominators counted over the whole step on every rank
(`GlobalCounts`), so gradient accumulation and data parallelism never change the value.

The policy-gradient surrogate is a typed slot, `PolicyLoss.objective` (`loss.objective=gspo`):
each objective returns a per-token loss L_{i,t} (a sequence-level objective broadcasts its
sequence value over the sequence's tokens), and PolicyLoss aggregates it with `agg_mode` and adds
the KL, entropy and NLL terms, so every term and every aggregation mode applies to every
objective. `ppo_clip` is here; the others live in their algorithm modules (algorithms/gspo.py,
cispo.py, sapo.py, gmpo.py, cov.py) and register with `register_objective`.

Clip-fraction metrics mean what verl's mean: `pg_clipfrac` is the share of loss tokens whose
clipped term is the one in use (the clip binds, either side); `pg_clipfrac_lower` is the share
the *dual* clip bounds (A < 0 and L > -A c; logged only with dual clip on). The two sides of the
ratio clip are split out as `pg_clipfrac_ratio_high` (A > 0, ratio above 1 + eps_high) and
`pg_clipfrac_ratio_low` (A < 0, ratio below 1 - eps_low); they add up to pg_clipfrac.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from core.batch import Batch, GlobalCounts, loss_mask
from core.config import Slot
from core.registry import Registry

if TYPE_CHECKING:
    from core.graph import Node

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3", "abs"]
Flags = dict[str, torch.Tensor]
"""Per-token [B, R] indicators (or values) an objective reports; PolicyLoss logs their token-mean."""


def aggregate(x_BR: torch.Tensor, mask_BR: torch.Tensor, mode: AggMode, counts: GlobalCounts,
              *, norm_const: float | None = None) -> torch.Tensor:
    """This micro-batch's share of agg(x) over the step (see ALGORITHMS.md for the four modes)."""
    m = mask_BR.bool()
    xm_BR = torch.where(m, x_BR, torch.zeros_like(x_BR))  # where, not *: pads may hold inf/nan
    if mode == "token-mean":
        return xm_BR.sum() / counts.tokens
    if mode == "seq-mean-token-mean":
        return (xm_BR.sum(-1) / m.sum(-1).clamp(min=1)).sum() / counts.seqs
    if mode == "seq-mean-token-sum":
        return xm_BR.sum() / counts.seqs
    if mode == "seq-mean-token-sum-norm":
        if not norm_const:
            raise ValueError("seq-mean-token-sum-norm needs norm_const (e.g. the max response length)")
        return xm_BR.sum() / (counts.seqs * norm_const)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AggMode.__args__)}")


def kl_penalty(logp_BR: torch.Tensor, ref_logp_BR: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from d = logp - ref_logp.

    k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1 with d clamped to +-20 and the result to +-10;
    abs = |d| (verl's "abs"; KL-Cov's penalty).
    """
    d = logp_BR - ref_logp_BR
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        d = d.clamp(-20.0, 20.0)
        return (torch.exp(-d) + d - 1).clamp(-10.0, 10.0)
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3, abs")


def ppo_clip_loss(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor, *,
                  eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate L = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)),
    with dual clip min(L, -A c) for A < 0. Returns (L_BR, 0/1 indicator tensors for metrics)."""
    log_ratio = (logp_BR - old_logp_BR).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv_BR * ratio
    clipped = -adv_BR * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    flags = {"pg_clipfrac_upper": (adv_BR > 0) & (ratio > 1 + eps_high),
             "pg_clipfrac_lower": (adv_BR < 0) & (ratio < 1 - eps_low)}
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -adv_BR * dual_clip
        flags["pg_clipfrac_dual"] = (adv_BR < 0) & (loss > cap)
        loss = torch.where(adv_BR < 0, torch.minimum(loss, cap), loss)
    return loss, flags


def seq_mean(x_BR: torch.Tensor, mask_BR: torch.Tensor) -> torch.Tensor:
    """[B]: the mean of x over each row's real tokens (0 for a row without one)."""
    m = mask_BR.bool()
    return torch.where(m, x_BR, torch.zeros_like(x_BR)).sum(-1) / m.sum(-1).clamp(min=1)


def clipped_log_ratio(logp_BR: torch.Tensor, old_logp_BR: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old) per token, clamped to +-20 before any exp (the house convention)."""
    return (logp_BR - old_logp_BR).clamp(-20.0, 20.0)


OBJECTIVES: Registry[type[PolicyObjective]] = Registry("policy objective")
"""Objective name -> its Config class (`loss.objective=<name>`)."""


def register_objective(name: str) -> Callable[[type[PolicyObjective]], type[PolicyObjective]]:
    """Class decorator: register a PolicyObjective subclass as `loss.objective=<name>`."""
    return OBJECTIVES.register(name)


@dataclass(kw_only=True, slots=True)
class PolicyObjective(Slot):
    """The `loss.objective` slot: the policy-gradient surrogate L_{i,t}, one variant per
    objective, each with its own parameters (`loss.objective.eps_high=...`).

    `__call__(logp, old_logp, adv, mask, mb=, loss=)` returns the per-token loss [B, R] (values at
    masked positions are ignored) and per-token flags for metrics. `mask` is the loss mask, the
    tokens a sequence-level statistic averages over."""
    name: str = "ppo_clip"
    """ppo_clip (default), gspo, gspo_token, cispo, sapo, gmpo, clip_cov or kl_cov."""
    uses_ppo_clip: ClassVar[bool] = False
    """True when the objective reads the loss's PPO clip range (loss.eps_low/eps_high/dual_clip)."""

    @classmethod
    def variant(cls, name: str) -> type:
        return OBJECTIVES.get(name)

    def inputs(self) -> tuple[str, ...]:
        """Batch fields the objective reads besides old_logp and advantages."""
        return ()

    def nodes(self, mask_field: str) -> list[Node]:
        """Graph nodes that produce those fields before the update (`mask_field` is the batch
        field holding the loss's tokens)."""
        return []

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        raise NotImplementedError(f"{type(self).__name__} does not define its loss")


def ppo_clip_flags(flags: Flags) -> Flags:
    """ppo_clip_loss's indicators under verl's metric names (module docstring)."""
    out = {"pg_clipfrac": flags["pg_clipfrac_upper"] | flags["pg_clipfrac_lower"],
           "pg_clipfrac_ratio_high": flags["pg_clipfrac_upper"],
           "pg_clipfrac_ratio_low": flags["pg_clipfrac_lower"]}
    if "pg_clipfrac_dual" in flags:
        out["pg_clipfrac_lower"] = flags["pg_clipfrac_dual"]
    return out


@register_objective("ppo_clip")
@dataclass(kw_only=True, slots=True)
class PPOClip(PolicyObjective):
    """PPO's clipped surrogate with clip-higher and dual clip (`ppo_clip_loss`); its range is the
    loss's own `eps_low`, `eps_high` and `dual_clip`, where every preset and recipe sets it."""
    name: str = "ppo_clip"
    uses_ppo_clip: ClassVar[bool] = True

    def __call__(self, logp_BR: torch.Tensor, old_logp_BR: torch.Tensor, adv_BR: torch.Tensor,
                 mask_BR: torch.Tensor, *, mb: Batch, loss: PolicyLoss) -> tuple[torch.Tensor, Flags]:
        pg_BR, flags = ppo_clip_loss(logp_BR, old_logp_BR, adv_BR, eps_low=loss.eps_low,
                                     eps_high=loss.eps_high, dual_clip=loss.dual_clip)
        return pg_BR, ppo_clip_flags(flags)


@dataclass(kw_only=True, slots=True)
class PolicyLoss:
    """Policy-gradient loss: the objective's surrogate (PPO clip by default), plus optional
    KL-to-reference, entropy bonus and positive-example NLL (VAPO); the actor's loss_fn.
    Tokens: `loss_mask` when present, else response_mask. When the batch carries
    `rollout_is_weights` (rollout correction), the surrogate's per-token loss is multiplied by
    them before aggregation (the KL, entropy and NLL terms are not)."""
    agg_mode: AggMode = "token-mean"
    objective: PolicyObjective = field(default_factory=PPOClip)
    """The surrogate (`loss.objective=cispo`, `loss.objective.eps_high=...`); see PolicyObjective."""
    eps_low: float = 0.2
    """PPO clip range below 1 (ppo_clip and clip_cov; the other objectives carry their own)."""
    eps_high: float = 0.2
    """> eps_low is DAPO's clip-higher."""
    dual_clip: float | None = None
    """Dual-clip constant c (> 1) for negative advantages; None disables."""
    norm_const: float | None = None
    """C of seq-mean-token-sum-norm; None: the response budget (max_new_tokens) the step's
    samples were generated with, read at run time (a length curriculum changes it)."""
    kl_coef: float = 0.0
    """Weight of KL(pi || ref) in the loss; needs a reference model."""
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    log_entropy: bool = True
    """Compute (chunked) entropy for the actor/entropy metric even without a bonus."""
    nll_coef: float = 0.0
    """VAPO's positive-example NLL weight mu: token-mean NLL over responses with score > 0.5."""

    def __post_init__(self) -> None:
        if self.dual_clip is not None and not self.objective.uses_ppo_clip:
            raise ValueError(f"loss.dual_clip={self.dual_clip} applies to the PPO clip, which objective "
                             f"{self.objective.name!r} does not use; set loss.dual_clip=null")

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0 or self.log_entropy

    def inputs(self) -> tuple[str, ...]:
        """Batch fields this loss reads besides the sequence."""
        return (("old_logp", "advantages") + self.objective.inputs()
                + (("ref_logp",) if self.kl_coef else ())
                + (("scores",) if self.nll_coef else ())
                + (("response_budget",) if self.agg_mode == "seq-mean-token-sum-norm" else ()))

    def __call__(self, logp_BR: torch.Tensor, entropy_BR: torch.Tensor | None, mb: Batch,
                 counts: GlobalCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = loss_mask(mb)
        norm_const = self.norm_const or counts.budget
        agg = lambda x: aggregate(x, mask, self.agg_mode, counts, norm_const=norm_const)  # noqa: E731
        token_mean = lambda x: aggregate(x.detach().float(), mask, "token-mean", counts)  # noqa: E731
        # Padding may hold anything (NaN included): give every objective finite inputs there, so
        # no 0 * NaN reaches a gradient; real tokens are untouched.
        real = mask.bool()
        old_BR = torch.where(real, mb.old_logp, logp_BR.detach())
        adv_BR = torch.where(real, mb.advantages, torch.zeros_like(mb.advantages))
        pg_BR, flags = self.objective(logp_BR, old_BR, adv_BR, mask, mb=mb, loss=self)
        if "rollout_is_weights" in mb:
            pg_BR = pg_BR * mb.rollout_is_weights
        loss = agg(pg_BR)
        metrics = {"pg_loss": loss.detach()}
        metrics.update({k: token_mean(v) for k, v in flags.items()})
        metrics["approx_kl_old"] = token_mean(kl_penalty(logp_BR, mb.old_logp, "k3"))
        if self.kl_coef:
            kl_BR = kl_penalty(logp_BR, mb.ref_logp, self.kl_estimator)
            loss = loss + self.kl_coef * agg(kl_BR)
            metrics["kl_ref"] = token_mean(kl_BR)
        if entropy_BR is not None:
            if self.entropy_coef:
                loss = loss - self.entropy_coef * agg(entropy_BR)
            metrics["entropy"] = token_mean(entropy_BR)
        if self.nll_coef:
            nll, share = positive_nll(logp_BR, mask, mb.scores, counts)
            loss = loss + self.nll_coef * nll
            metrics["positive_nll"] = nll.detach()
            metrics["positive_frac"] = share
        return loss, metrics


def positive_nll(logp_BR: torch.Tensor, mask_BR: torch.Tensor, scores_B: torch.Tensor,
                 counts: GlobalCounts) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean NLL over the responses judged correct (score > 0.5), as this micro-batch's
    share of the step, and the share of the step's tokens that are positive.

    The denominator is the step's count of loss tokens (all responses), so the term's weight
    grows with the fraction of correct answers, as an NLL added to a token-mean loss does."""
    pos_BR = mask_BR.bool() & (scores_B > 0.5)[:, None]
    nll = aggregate(-logp_BR, pos_BR, "token-mean", counts)
    return nll, pos_BR.sum().double() / counts.tokens


@dataclass(kw_only=True, slots=True)
class ValueLoss:
    """Clipped value loss 0.5 * agg(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))."""
    clip: float | None = 0.2
    """eps_v; None disables clipping."""
    agg_mode: AggMode = "token-mean"

    def __call__(self, values_BR: torch.Tensor, mb: Batch, counts: GlobalCounts
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = loss_mask(mb)
        err = (values_BR - mb.returns).square()
        if self.clip is not None:
            clipped = mb.values + (values_BR - mb.values).clamp(-self.clip, self.clip)
            err_clipped = (clipped - mb.returns).square()
            clipfrac = aggregate((err_clipped > err).float(), mask, "token-mean", counts)
            err = torch.maximum(err, err_clipped)
        else:
            clipfrac = torch.zeros(())
        loss = 0.5 * aggregate(err, mask, self.agg_mode, counts)
        return loss, {"vf_loss": loss.detach(), "vf_clipfrac": clipfrac,
                      "values": aggregate(values_BR.detach(), mask, "token-mean", counts)}


@dataclass(kw_only=True, slots=True)
class NLLLoss:
    """Supervised negative log-likelihood of the response tokens (SFT)."""
    agg_mode: AggMode = "token-mean"
    needs_entropy: bool = False

    def __call__(self, logp_BR: torch.Tensor, entropy_BR: torch.Tensor | None, mb: Batch,
                 counts: GlobalCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = aggregate(-logp_BR, loss_mask(mb), self.agg_mode, counts)
        return loss, {"nll": loss.detach()}
