"""Curricula: training in stages over parts of the prompt set, and per-problem pass rates.

* `length` (FastCuRL, arXiv 2503.17287): prompts are sorted by token length and split into
  `stages` equal levels, short first; stage k trains on level k (or levels 0..k with
  `cumulative`), each stage with its own response budget (`max_new_tokens[k]`).
* `difficulty` (difficulty-staged RL): before step 1 the initial policy's pass rate of every
  problem is estimated from `probe_n` samples; problems it always or never solves are dropped
  (0 < pass rate < 1 is where the gradient is), and the rest are split into stages from the
  easiest (highest pass rate) to the hardest.

Stage k starts at step `boundaries[k - 1] + 1`; the stage is logged every step as
`curriculum/stage`. `PassRateTracker` keeps running per-problem pass rates from the trained
batches; any algorithm can read it (logged as `curriculum/*`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from core.batch import Batch
from core.data import PromptDataset, PromptStream

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class CurriculumConfig:
    kind: Literal["none", "length", "difficulty"] = "none"
    stages: int = 1
    boundaries: list[int] = field(default_factory=list)
    """Last step of each stage but the final one (len = stages - 1, increasing)."""
    max_new_tokens: list[int] = field(default_factory=list)
    """Response budget per stage; empty: rollout.max_new_tokens throughout."""
    cumulative: bool = False
    """length: stage k trains on levels 0..k instead of level k alone."""
    probe_n: int = 8
    """difficulty: samples per problem to estimate the initial pass rates."""

    def __post_init__(self) -> None:
        if self.kind != "none":
            if len(self.boundaries) != self.stages - 1 or sorted(self.boundaries) != self.boundaries:
                raise ValueError(f"data.curriculum.boundaries must list {self.stages - 1} increasing "
                                 f"steps, got {self.boundaries}")
            if self.max_new_tokens and len(self.max_new_tokens) != self.stages:
                raise ValueError(f"data.curriculum.max_new_tokens needs {self.stages} entries")


def length_levels(dataset: PromptDataset, stages: int, *, cumulative: bool) -> list[list[int]]:
    """Positions of each stage's prompts: sorted by length, cut into equal levels."""
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.ids[i]), i))
    cuts = [round(k * len(order) / stages) for k in range(stages + 1)]
    levels = [order[cuts[k]:cuts[k + 1]] for k in range(stages)]
    return [sorted(sum(levels[:k + 1], [])) if cumulative else sorted(level)
            for k, level in enumerate(levels)]


def difficulty_levels(pass_rates: Sequence[float], stages: int) -> list[list[int]]:
    """Positions with 0 < pass rate < 1, easiest first, cut into equal stages."""
    keep = sorted((i for i, p in enumerate(pass_rates) if 0 < p < 1), key=lambda i: (-pass_rates[i], i))
    if len(keep) < stages:
        raise ValueError(f"only {len(keep)} problems have 0 < pass rate < 1; cannot fill {stages} stages")
    cuts = [round(k * len(keep) / stages) for k in range(stages + 1)]
    return [sorted(keep[cuts[k]:cuts[k + 1]]) for k in range(stages)]


class CurriculumStream:
    """The prompt stream of the current stage; same interface as PromptStream."""

    def __init__(self, cfg: CurriculumConfig, dataset: PromptDataset, levels: list[list[int]],
                 **stream_kwargs: Any) -> None:
        self.cfg = cfg
        self.levels = levels
        self.streams = [PromptStream(dataset.subset(level), **stream_kwargs) for level in levels]
        self.stage = 0

    def stage_at(self, step: int) -> int:
        """The stage of training step `step` (1-based)."""
        return sum(step > b for b in self.cfg.boundaries)

    def set_stage(self, stage: int) -> None:
        if stage != self.stage:
            logger.info("curriculum: stage %d -> %d (%d prompts)", self.stage, stage, len(self.levels[stage]))
        self.stage = stage

    @property
    def current(self) -> PromptStream:
        return self.streams[self.stage]

    def __iter__(self) -> CurriculumStream:
        return self

    def __next__(self) -> Batch:
        return next(self.current)

    @property
    def epoch(self) -> int:
        return self.current.epoch

    @property
    def sampler(self) -> Any:
        return self.current.sampler

    def position(self) -> tuple[int, int]:
        return self.current.position()

    def seek(self, epoch: int, samples_consumed_per_rank: int) -> None:
        self.current.seek(epoch, samples_consumed_per_rank)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.current.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.current.load_state_dict(state)


class PassRateTracker:
    """Running per-problem pass rates from trained batches (group ids are problem ids)."""

    def __init__(self) -> None:
        self.attempts: dict[int, int] = {}
        self.solved: dict[int, float] = {}

    def update(self, group_ids_B: torch.Tensor, scores_B: torch.Tensor) -> None:
        for g, s in zip(group_ids_B.tolist(), scores_B.tolist()):
            self.attempts[g] = self.attempts.get(g, 0) + 1
            self.solved[g] = self.solved.get(g, 0.0) + float(s)

    def pass_rate(self, problem: int) -> float | None:
        n = self.attempts.get(problem)
        return None if not n else self.solved[problem] / n

    def metrics(self) -> dict[str, float]:
        rates = [self.solved[g] / n for g, n in self.attempts.items()]
        if not rates:
            return {}
        return {"curriculum/problems_seen": float(len(rates)),
                "curriculum/mean_pass_rate": sum(rates) / len(rates),
                "curriculum/always_solved_frac": sum(r == 1 for r in rates) / len(rates),
                "curriculum/never_solved_frac": sum(r == 0 for r in rates) / len(rates)}

    def state_dict(self) -> dict[str, Any]:
        return {"attempts": dict(self.attempts), "solved": dict(self.solved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attempts, self.solved = dict(state["attempts"]), dict(state["solved"])
