"""Dr. GRPO: GRPO done right (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783).

GRPO's two normalisations bias learning: dividing by the group's reward std over-weights
questions that are too easy or too hard, and averaging each response's loss over its own
length (seq-mean-token-mean) favours long wrong answers. Dr. GRPO removes both:

    A_i = r_i - mean_g                               (no std)
    L   = (1/B) sum_i sum_t max(-A_i rho, -A_i clip(rho, 1 - eps, 1 + eps)) / C

with C a constant, the response budget (max_new_tokens the samples were generated with:
`seq-mean-token-sum-norm`), no KL term. understand-r1-zero: G = 8, 128 prompts, lr 1e-6
constant, temperature 1.0 (configs/drgrpo.yaml).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=drgrpo
"""
from __future__ import annotations

from dataclasses import dataclass, field

from algorithms.base import register_algorithm
from algorithms.grpo import GRPOConfig, GRPOLoss, grpo_graph
from algorithms.losses import AggMode
from core.graph import Graph


@dataclass(kw_only=True, slots=True)
class DrGRPOLoss(GRPOLoss):
    agg_mode: AggMode = "seq-mean-token-sum-norm"
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class DrGRPOConfig(GRPOConfig):
    name: str = "drgrpo"
    loss: DrGRPOLoss = field(default_factory=DrGRPOLoss)
    norm_std: bool = False


@register_algorithm("drgrpo", DrGRPOConfig)
def build_graph(cfg: DrGRPOConfig) -> Graph:
    return grpo_graph("drgrpo", cfg)
