"""The algorithm slot: each algorithm is its Config (a preset) plus a graph builder.

`algorithm.name` picks the schema of the whole `algorithm:` section (core.config.Slot): a
registered name, or "package.module:function" for a user algorithm, whose Config is the
annotation of the function's first parameter. Either way the section is loaded strictly, with
that Config's defaults under any partial override:

    @register_algorithm("median_grpo", MedianConfig)
    def build_graph(cfg: MedianConfig) -> Graph: ...

Presets are Config subclasses with their own defaults (DAPOConfig(GRPOConfig) sets eps_high
0.28, token-mean, no KL, ...); the policy-gradient family shares `PolicyGradientConfig`. Keys are
`algorithm.<field>` (`algorithm.loss.eps_high`, `algorithm.norm_std`).
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Callable

from algorithms.correction import RolloutCorrection
from algorithms.losses import PolicyLoss
from algorithms.shaping import RewardShaping
from core.config import Slot
from core.graph import Graph, Plan
from core.registry import Registry


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig(Slot):
    name: str = "grpo"
    """A registered algorithm (grpo, drgrpo, dapo, ppo, orz, vapo, reinforce_pp, rloo, gspo,
    gspo_token, cispo, sapo, gmpo, clip_cov, kl_cov, opd) or "package.module:function"; it
    chooses the schema of this whole section."""

    @classmethod
    def variant(cls, name: str) -> type:
        return get_algorithm(name).config


@dataclass(kw_only=True, slots=True)
class PolicyGradientConfig(AlgorithmConfig):
    """What every policy-gradient preset has (each preset subclasses this with its defaults)."""
    loss: PolicyLoss = field(default_factory=PolicyLoss)
    """The actor's objective (PPO clip, aggregation, KL, entropy, NLL terms)."""
    rewards: RewardShaping = field(default_factory=RewardShaping)
    """From scorer output to the reward trained on."""
    recompute_old_logp: bool = True
    """Recompute the sampling policy's log-probs with the actor (False: trust the engine's)."""
    overlong_filter: bool = False
    """Drop responses cut by the length budget from the loss (DAPO)."""
    rollout_correction: RolloutCorrection = field(default_factory=RolloutCorrection)
    """Engine/trainer mismatch: truncated or masked IS, geometric mask (algorithms/correction.py);
    off by default. The mismatch/* metrics are logged whenever old_logp is recomputed."""


GraphBuilder = Callable[..., "Graph | Plan"]


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    config: type[AlgorithmConfig]
    build: GraphBuilder
    """build(cfg) -> Graph | Plan, with cfg an instance of `config`."""


ALGORITHMS: Registry[Algorithm] = Registry("algorithm", importable=True)
"""Built-in algorithms by name (get_algorithm also takes import paths)."""


def register_algorithm(name: str, config: type[AlgorithmConfig]) -> Callable[[GraphBuilder], GraphBuilder]:
    """Register `build(cfg: config) -> Graph | Plan` as algorithm `name`."""
    def wrap(build: GraphBuilder) -> GraphBuilder:
        ALGORITHMS.register(name)(Algorithm(name, config, build))
        return build
    return wrap


def get_algorithm(name: str) -> Algorithm:
    """A registered algorithm, or a builder imported from "package.module:function"."""
    if ":" not in name:
        return ALGORITHMS.get(name)
    build = Registry.import_object(name, kind="algorithm")
    return Algorithm(name, config_of(build, name), build)


def config_of(build: GraphBuilder, name: str) -> type[AlgorithmConfig]:
    """The Config a builder takes: the annotation of its first parameter."""
    if not callable(build):
        raise ValueError(f"algorithm {name!r} is not a function")
    params = list(inspect.signature(build).parameters)
    hints = typing.get_type_hints(build)
    config = hints.get(params[0]) if params else None
    if not (isinstance(config, type) and issubclass(config, AlgorithmConfig)):
        raise ValueError(f"algorithm {name!r}: the first parameter of {build.__name__} must be annotated "
                         f"with its Config, a subclass of algorithms.base.AlgorithmConfig "
                         f"(e.g. PolicyGradientConfig), got {config!r}")
    return config
