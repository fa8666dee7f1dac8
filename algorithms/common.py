"""The nodes algorithms share: generation, scoring and shaping, log-probs, reference, updates.

Algorithm modules compose these; each helper returns ready-made `Node`s, so an algorithm's
build function reads as the list of its steps.
"""
from __future__ import annotations

from typing import Any

import torch

from algorithms.base import PolicyGradientConfig
from algorithms.correction import RolloutCorrection, correct, mismatch_metrics
from algorithms.losses import PolicyLoss, ValueLoss
from algorithms.shaping import RewardShaping, shape_rewards
from core.batch import Batch, declare_field
from core.data import PROMPT_FIELDS
from core.graph import PROMPTS, Node, Result

SEQUENCE = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "observation_mask")
"""The fields a forward pass over prompt + response needs."""
GENERATED = ("response_ids", "response_mask", "observation_mask", "env_reward", "rollout_logp", "response_text",
             "finish_reason", "response_budget")
"""The fields generation adds."""

declare_field("rollout_is_weights", shape="B,R",
              doc="truncated IS weight pi_old / pi_rollout of each token (rollout correction), no gradient")


def generate_batch(batch: Batch, *, rollout: Any, prompts: Any) -> Result:
    """The training stream's samples; the prompt stream tops up the rollout buffer (off-policy
    steps) and is not touched otherwise."""
    return rollout.generate(batch, prompts=prompts)


def generate() -> Node:
    return Node("generate", generate_batch, PROMPT_FIELDS, GENERATED, needs=("rollout", PROMPTS), batch_in=True)


def score() -> Node:
    return Node("score", "reward.score", ("response_text", "ground_truth", "data_source", "env_reward"), ("scores",))


def shape(shaping: RewardShaping) -> Node:
    return Node("shape_rewards", shape_rewards,
                ("scores", "response_mask", "finish_reason", "response_text", "response_budget"), ("rewards",),
                kwargs={"cfg": shaping})


def engine_logp(rollout_logp_BR: torch.Tensor) -> torch.Tensor:
    """old_logp taken from the engine instead of recomputed by the actor."""
    return rollout_logp_BR


def old_logp(recompute: bool = True) -> Node:
    if recompute:
        return Node("old_logp", "actor.log_probs", SEQUENCE, ("old_logp",))
    return Node("old_logp", engine_logp, ("rollout_logp",), ("old_logp",))


def ref_logp() -> Node:
    return Node("ref_logp", "reference.log_probs", SEQUENCE, ("ref_logp",))


def follow_actor(*, reference, actor) -> None:
    reference.follow(actor)


def anchor() -> Node:
    """T1's dynamic anchor: after the update, the reference follows the actor as its
    `reference.anchor` rule says (fixed: it stays)."""
    return Node("anchor", follow_actor, (), (), needs=("reference", "actor"), after=("update_actor",))


def reference_nodes(used: bool) -> tuple[list[Node], list[Node]]:
    """(before the update, after it): the reference's log-probs and its anchor, when a KL term
    uses the reference; nothing otherwise (no reference model is built)."""
    return ([ref_logp()], [anchor()]) if used else ([], [])


def truncation_filter(response_mask_BR: torch.Tensor, finish_reason: list[str]) -> torch.Tensor:
    """DAPO's overlong filtering: responses cut by the budget leave the loss."""
    cut = torch.tensor([r == "length" for r in finish_reason], device=response_mask_BR.device)
    return response_mask_BR * (~cut)[:, None]


def overlong_filter() -> Node:
    return Node("overlong_filter", truncation_filter, ("response_mask", "finish_reason"), ("loss_mask",))


def mismatch(old_logp_BR: torch.Tensor, rollout_logp_BR: torch.Tensor, response_mask_BR: torch.Tensor) -> Result:
    """The engine/trainer mismatch metrics (algorithms/correction.py), global over ranks."""
    return Result(metrics=mismatch_metrics(old_logp_BR, rollout_logp_BR, response_mask_BR))


def mismatch_node() -> Node:
    return Node("mismatch", mismatch, ("old_logp", "rollout_logp", "response_mask"), ())


def correct_rollout(old_logp_BR: torch.Tensor, rollout_logp_BR: torch.Tensor, response_mask_BR: torch.Tensor,
                    finish_reason: list[str] | None = None, *, cfg: RolloutCorrection) -> Result:
    """Rollout correction's IS weights and/or loss mask (the outputs cfg turns on, in that
    order); with `finish_reason` the mask also applies DAPO's overlong filter."""
    weights, keep, metrics = correct(old_logp_BR, rollout_logp_BR, response_mask_BR, cfg)
    out: list[torch.Tensor] = [] if weights is None else [weights]
    if keep is not None:
        out.append(keep if finish_reason is None else truncation_filter(keep, finish_reason))
    return Result(out[0] if len(out) == 1 else tuple(out), metrics=metrics)


def rollout_correction(cfg: RolloutCorrection, *, overlong: bool) -> Node:
    outputs = (("rollout_is_weights",) if cfg.is_level else ()) + (("loss_mask",) if cfg.masks else ())
    inputs = ("old_logp", "rollout_logp", "response_mask") + (("finish_reason",) if overlong and cfg.masks else ())
    return Node("rollout_correction", correct_rollout, inputs, outputs, kwargs={"cfg": cfg})


def update_actor(loss: PolicyLoss, *, filtered: bool = False, extra: tuple[str, ...] = ()) -> Node:
    return Node("update_actor", "actor.update",
                SEQUENCE + loss.inputs() + (("loss_mask",) if filtered else ()) + extra,
                kwargs={"loss_fn": loss})


def policy_update(cfg: PolicyGradientConfig) -> list[Node]:
    """The actor's update with cfg.loss, preceded by what cfg asks for: the mismatch metrics
    (whenever old_logp is recomputed), rollout correction, DAPO's overlong filter and the
    nodes the objective needs (Clip-Cov's token selection)."""
    rc = cfg.rollout_correction
    if rc.enabled and not cfg.recompute_old_logp:
        raise ValueError("algorithm.rollout_correction compares the trainer's old log-probs with the engine's, "
                         "but recompute_old_logp=false (bypass) makes them the same tensor: the objective's "
                         "ratio pi / pi_rollout is then the correction; turn one of them off")
    nodes = [mismatch_node()] if cfg.recompute_old_logp else []
    if rc.enabled:
        nodes.append(rollout_correction(rc, overlong=cfg.overlong_filter))
    if cfg.overlong_filter and not rc.masks:
        nodes.append(overlong_filter())
    filtered = cfg.overlong_filter or rc.masks
    nodes += cfg.loss.objective.nodes("loss_mask" if filtered else "response_mask")
    extra = ("rollout_is_weights",) if rc.is_level else ()
    return nodes + [update_actor(cfg.loss, filtered=filtered, extra=extra)]


def critic_values() -> Node:
    return Node("values", "critic.values", SEQUENCE, ("values",))


def update_critic(loss: ValueLoss, *, filtered: bool = False) -> Node:
    return Node("update_critic", "critic.update",
                SEQUENCE + ("values", "returns") + (("loss_mask",) if filtered else ()),
                kwargs={"loss": loss})
