"""PPO with a learned critic and GAE (Schulman et al. 2017; the RLHF form of Ouyang et al. 2022).

The critic V estimates the return from each response token's state. With the sequence reward r
on the last token (minus an optional per-token KL penalty beta * k(pi_old, pi_ref)):

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

A is whitened over the global batch. The actor minimises the PPO-clip surrogate (eps 0.2,
token-mean); the critic minimises 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-0.2) - R)^2).
Defaults: gamma 1, lam 0.95, actor lr 1e-6, critic lr ~5e-6 (configs/ppo.yaml).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=ppo
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms import common
from algorithms.advantages import gae, last_token_rewards, whiten
from algorithms.base import PolicyGradientConfig, register_algorithm
from algorithms.losses import KLEstimator, ValueLoss, kl_penalty
from core.config import at_least, between
from core.graph import Graph, Node


@dataclass(kw_only=True, slots=True)
class PPOConfig(PolicyGradientConfig):
    name: str = "ppo"
    value_loss: ValueLoss = field(default_factory=ValueLoss)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    reward_kl_coef: float = 0.0
    """KL in the reward: r_t -= coef * k(pi_old, pi_ref) at every token (needs a reference)."""
    reward_kl_estimator: KLEstimator = "k1"

    def __post_init__(self) -> None:
        between(self, 0, 1, "gamma", "lam")
        at_least(self, 0, "reward_kl_coef")


def token_rewards(rewards_B: torch.Tensor, mask_BR: torch.Tensor, *kl_inputs: torch.Tensor,
                  coef: float = 0.0, estimator: KLEstimator = "k1") -> torch.Tensor:
    """[B, R]: the sequence reward on the last token, minus coef * KL at every token when
    (old_logp, ref_logp) are given."""
    r_BR = last_token_rewards(rewards_B, mask_BR)
    if coef and kl_inputs:
        kl_BR = kl_penalty(kl_inputs[0], kl_inputs[1], estimator)
        r_BR = r_BR - coef * torch.where(mask_BR.bool(), kl_BR, torch.zeros_like(kl_BR))
    return r_BR


def gae_advantages(token_rewards_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor,
                   *, gamma: float, lam: float, whiten_advantages: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by GAE; advantages whitened over all ranks' tokens if asked."""
    adv_BR, ret_BR = gae(token_rewards_BR, values_BR, mask_BR, gamma=gamma, lam=lam)
    return (whiten(adv_BR, mask_BR) if whiten_advantages else adv_BR), ret_BR


def critic_graph_nodes(c: PPOConfig, advantage: Node) -> list[Node]:
    """Sampling, scoring, values and per-token rewards, then `advantage`, then both updates:
    the shared body of PPO, ORZ and VAPO."""
    kl_reward = c.reward_kl_coef != 0
    ref_before, ref_after = common.reference_nodes(bool(c.loss.kl_coef or kl_reward))
    return [
        common.generate(),
        common.score(),
        common.shape(c.rewards),
        common.old_logp(c.recompute_old_logp),
        *ref_before,
        common.critic_values(),
        Node("token_rewards", token_rewards,
             ("rewards", "response_mask") + (("old_logp", "ref_logp") if kl_reward else ()),
             ("token_rewards",), kwargs={"coef": c.reward_kl_coef, "estimator": c.reward_kl_estimator}),
        advantage,
        *common.policy_update(c),
        common.update_critic(c.value_loss, filtered=c.overlong_filter),
        *ref_after,
    ]


def ppo_graph(name: str, c: PPOConfig) -> Graph:
    return Graph(name, critic_graph_nodes(c, Node(
        "gae", gae_advantages, ("token_rewards", "values", "response_mask"), ("advantages", "returns"),
        kwargs={"gamma": c.gamma, "lam": c.lam, "whiten_advantages": c.whiten_advantages})))


@register_algorithm("ppo", PPOConfig)
def build_graph(cfg: PPOConfig) -> Graph:
    return ppo_graph("ppo", cfg)
