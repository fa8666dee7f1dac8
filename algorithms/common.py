"""The nodes algorithms share: generation, scoring and shaping, log-probs, reference, updates.

Algorithm modules compose these; each helper returns ready-made `Node`s, so an algorithm's
build function reads as the list of its steps.
"""
from __future__ import annotations

import torch

from algorithms.base import PolicyGradientConfig
from algorithms.losses import PolicyLoss, ValueLoss
from algorithms.shaping import RewardShaping, shape_rewards
from core.data import PROMPT_FIELDS
from core.graph import Node

SEQUENCE = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
"""The fields a forward pass over prompt + response needs."""
GENERATED = ("response_ids", "response_mask", "rollout_logp", "response_text", "finish_reason",
             "response_budget")
"""The fields generation adds."""


def generate() -> Node:
    return Node("generate", "rollout.generate", PROMPT_FIELDS, GENERATED)


def score() -> Node:
    return Node("score", "reward.score", ("response_text", "ground_truth", "data_source"), ("scores",))


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


def update_actor(loss: PolicyLoss, *, filtered: bool = False) -> Node:
    return Node("update_actor", "actor.update", SEQUENCE + loss.inputs() + (("loss_mask",) if filtered else ()),
                kwargs={"loss_fn": loss})


def policy_update(cfg: PolicyGradientConfig) -> list[Node]:
    """The actor's update with cfg.loss, after DAPO's overlong filter when cfg asks for it."""
    return ([overlong_filter()] if cfg.overlong_filter else []) + [update_actor(cfg.loss, filtered=cfg.overlong_filter)]


def critic_values() -> Node:
    return Node("values", "critic.values", SEQUENCE, ("values",))


def update_critic(loss: ValueLoss, *, filtered: bool = False) -> Node:
    return Node("update_critic", "critic.update",
                SEQUENCE + ("values", "returns") + (("loss_mask",) if filtered else ()),
                kwargs={"loss": loss})
