"""GRPO (DeepSeekMath, arXiv 2402.03300; as used by DeepSeek-R1-Zero).

For each prompt, sample a group of G responses; reward each; the advantage of response i is its
reward normalised within the group, A_i = (r_i - mean_g) / (std_g + 1e-6) (unbiased std),
shared by all its tokens. The policy minimises the PPO-clip surrogate

    L = agg_{i,t} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high))
        + beta * agg_{i,t} KL_k3(pi || pi_ref)

with rho = pi / pi_old, the paper's `seq-mean-token-mean` aggregation by default and beta =
algorithm.kl_coef (0 builds no reference model). Departures from the paper: none by default;
every term is a config switch (aggregation, clip-higher, dual clip, entropy bonus).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml
"""
from __future__ import annotations

from algorithms.advantages import grpo_advantages
from algorithms.base import register_algorithm
from algorithms.losses import PolicyLoss
from core.data import PROMPT_FIELDS
from core.graph import Graph, Node

SEQUENCE = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
GENERATED = ("response_ids", "response_mask", "rollout_logp", "response_text", "finish_reason")


def policy_loss(job) -> PolicyLoss:
    a = job.algorithm
    return PolicyLoss(agg_mode=a.loss_agg_mode, eps_low=a.clip_eps_low, eps_high=a.clip_eps_high,
                      dual_clip=a.dual_clip, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                      entropy_coef=a.entropy_coef,
                      norm_const=a.norm_const or job.rollout.max_new_tokens)


def engine_logp(rollout_logp):
    """old_logp taken from the engine instead of recomputed by the actor."""
    return rollout_logp


@register_algorithm("grpo")
def build_graph(job) -> Graph:
    a = job.algorithm
    use_kl = a.kl_coef != 0
    old_logp = (Node("old_logp", "actor.log_probs", SEQUENCE, ("old_logp",))
                if a.recompute_old_logp else Node("old_logp", engine_logp, ("rollout_logp",), ("old_logp",)))
    return Graph("grpo", [
        Node("generate", "rollout.generate", PROMPT_FIELDS, GENERATED),
        Node("reward", "reward.score", ("response_text", "ground_truth", "data_source"), ("rewards",)),
        old_logp,
        *([Node("ref_logp", "reference.log_probs", SEQUENCE, ("ref_logp",))] if use_kl else []),
        Node("advantages", grpo_advantages, ("rewards", "group_ids", "response_mask"), ("advantages",),
             kwargs={"norm_std": a.norm_std}),
        Node("update_actor", "actor.update",
             SEQUENCE + ("old_logp", "advantages") + (("ref_logp",) if use_kl else ()),
             kwargs={"loss_fn": policy_loss(job)}),
    ])
