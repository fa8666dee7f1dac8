"""The algorithm config shared by every algorithm, and the registry of graph builders.

An algorithm is a function `build_graph(job: JobConfig) -> Graph`, registered by name with
`@register_algorithm("name")`, or referenced from YAML by import path
(`algorithm.name: my_package.my_module:build_graph`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from algorithms.losses import AggMode, KLEstimator
from core.graph import Graph


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    name: str = "grpo"
    """A registered algorithm name, or "package.module:function" for a user-defined graph."""
    loss_agg_mode: AggMode = "seq-mean-token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    """> clip_eps_low is DAPO's clip-higher."""
    dual_clip: float | None = None
    """Dual-clip constant c (> 1) for negative advantages; None disables."""
    kl_coef: float = 0.0
    """KL-to-reference weight in the loss; 0 builds no reference model."""
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    norm_std: bool = True
    """GRPO: divide group-centred rewards by the group std (False: Dr. GRPO)."""
    norm_const: float | None = None
    """C of seq-mean-token-sum-norm; None: rollout.max_new_tokens."""
    recompute_old_logp: bool = True
    """Recompute the sampling policy's log-probs with the actor (False: trust the engine's)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form parameters for user-defined algorithms."""


GraphBuilder = Callable[[Any], Graph]
ALGORITHMS: dict[str, GraphBuilder] = {}


def register_algorithm(name: str) -> Callable[[GraphBuilder], GraphBuilder]:
    def wrap(fn: GraphBuilder) -> GraphBuilder:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered")
        ALGORITHMS[name] = fn
        return fn
    return wrap


def get_algorithm(name: str) -> GraphBuilder:
    """A registered builder, or one imported from "package.module:function"."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"algorithm.name {name!r}: cannot import {attr!r} from {module!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"algorithm.name {name!r} is not callable")
        return fn
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHMS))} "
                         f"(or a 'package.module:function' import path)")
    return ALGORITHMS[name]
