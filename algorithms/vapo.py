"""VAPO: Value-based Augmented PPO (Yuan et al., arXiv 2504.05118).

PPO with a critic, made to work for long chain-of-thought:

* value pre-training: before any policy update, the critic is fitted to Monte-Carlo returns
  (lambda = 1) of samples from the initial policy, until its loss settles (a stage of up to
  `value_pretrain_steps` steps; it stops early when the mean value loss of the last `window`
  steps moved less than `tol` relative to the `window` before);
* decoupled GAE: critic targets with lambda_critic = 1 (unbiased), policy advantages with
  lambda_policy;
* length-adaptive GAE: lambda_policy = 1 - 1 / (alpha * l), l = the response length, alpha = 0.05;
* clip-higher (0.2 / 0.28), token-mean loss, group sampling (rollout.n responses per prompt);
* positive-example NLL: + mu * token-mean NLL of the correct responses, mu = 0.1.

Paper: actor lr 1e-6, critic 2e-6, gamma 1, 512 prompts x 16 (configs/vapo.yaml). Departure:
lambda_policy is clamped to [0, 1] for responses shorter than 1/alpha tokens.

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=vapo
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms import common
from algorithms.advantages import decoupled_gae, gae, length_adaptive_lambda, whiten
from algorithms.base import register_algorithm
from algorithms.losses import PolicyLoss
from algorithms.ppo import PPOConfig, critic_graph_nodes, token_rewards
from core.config import above, at_least, between
from core.graph import Graph, Node, Plan, Stage


@dataclass(kw_only=True, slots=True)
class VAPOLoss(PolicyLoss):
    eps_high: float = 0.28
    nll_coef: float = 0.1


@dataclass(kw_only=True, slots=True)
class VAPOConfig(PPOConfig):
    name: str = "vapo"
    loss: VAPOLoss = field(default_factory=VAPOLoss)
    lam_critic: float = 1.0
    alpha: float = 0.05
    """Length-adaptive lambda_policy = 1 - 1 / (alpha * length)."""
    value_pretrain_steps: int = 50
    value_pretrain_window: int = 5
    value_pretrain_tol: float = 0.05

    def __post_init__(self) -> None:
        PPOConfig.__post_init__(self)
        between(self, 0, 1, "lam_critic")
        above(self, 0, "alpha")
        at_least(self, 0, "value_pretrain_steps", "value_pretrain_tol")
        at_least(self, 1, "value_pretrain_window")


def vapo_advantages(token_rewards_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor,
                    *, gamma: float, lam_critic: float, alpha: float, whiten_advantages: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    lam_policy_B = length_adaptive_lambda(mask_BR.sum(-1), alpha=alpha)
    adv_BR, ret_BR = decoupled_gae(token_rewards_BR, values_BR, mask_BR, gamma=gamma,
                                   lam_critic=lam_critic, lam_policy=lam_policy_B)
    return (whiten(adv_BR, mask_BR) if whiten_advantages else adv_BR), ret_BR


def monte_carlo_returns(token_rewards_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor,
                        *, gamma: float) -> torch.Tensor:
    """Critic targets with lambda = 1 (value pre-training)."""
    return gae(token_rewards_BR, values_BR, mask_BR, gamma=gamma, lam=1.0)[1]


def settled(history: list[dict[str, float]], *, key: str, window: int, tol: float) -> bool:
    """True when the mean of `key` over the last window moved < tol (relative) from the window before."""
    vals = [h[key] for h in history if key in h]
    if len(vals) < 2 * window:
        return False
    last, prev = sum(vals[-window:]) / window, sum(vals[-2 * window:-window]) / window
    return abs(last - prev) <= tol * max(abs(prev), 1e-8)


def value_pretraining(c: VAPOConfig) -> Stage:
    graph = Graph("vapo_value_pretrain", [
        common.generate(), common.score(), common.shape(c.rewards), common.critic_values(),
        Node("token_rewards", token_rewards, ("rewards", "response_mask"), ("token_rewards",)),
        Node("returns", monte_carlo_returns, ("token_rewards", "values", "response_mask"), ("returns",),
             kwargs={"gamma": c.gamma}),
        common.update_critic(c.value_loss),
    ])
    stop = lambda h: settled(h, key="critic/vf_loss", window=c.value_pretrain_window,  # noqa: E731
                             tol=c.value_pretrain_tol)
    return Stage("value_pretrain", graph, max_steps=c.value_pretrain_steps, stop=stop)


@register_algorithm("vapo", VAPOConfig)
def build_graph(c: VAPOConfig) -> Plan:
    train = Graph("vapo", critic_graph_nodes(c, Node(
        "advantages", vapo_advantages, ("token_rewards", "values", "response_mask"), ("advantages", "returns"),
        kwargs={"gamma": c.gamma, "lam_critic": c.lam_critic, "alpha": c.alpha,
                "whiten_advantages": c.whiten_advantages})))
    stages = [value_pretraining(c)] if c.value_pretrain_steps > 0 else []
    return Plan(train=train, stages=stages)
