"""The algorithm config shared by every algorithm, and the registry of graph builders.

An algorithm is a function `build_graph(job: JobConfig) -> Graph`, registered by name with
`@register_algorithm("name")`, or referenced from YAML by import path
(`algorithm.name: my_package.my_module:build_graph`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from algorithms.losses import AggMode, KLEstimator
from core.graph import Graph
from core.registry import Registry


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
ALGORITHMS: Registry[GraphBuilder] = Registry("algorithm", importable=True)
register_algorithm = ALGORITHMS.register
get_algorithm = ALGORITHMS.get
"""A registered graph builder, or one imported from "package.module:function"."""
