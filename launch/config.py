"""The job config: the whole schema tree a training YAML file is an instance of.

Each section is the Config of the component that reads it. Public keys that scripts and later
work rely on: run.output_dir, run.steps, run.seed, algorithm.name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import algorithms  # noqa: F401  (registers the built-in algorithms, whose Configs the slot picks)
from algorithms.base import AlgorithmConfig
from algorithms.grpo import GRPOConfig
from core.checkpoint import CheckpointConfig
from core.config import RangeError, above, at_least, between
from core.curriculum import CurriculumConfig
from core.data import PromptFormat
from core.hybrid import HybridConfig
from core.models import ModelConfig
from core.tracking import TrackingConfig
from launch.tasks import TaskConfig
from roles.actor import Actor
from roles.critic import Critic
from roles.reference import Reference
from roles.reward import Reward
from roles.rollout import Rollout


@dataclass(kw_only=True, slots=True)
class RunConfig:
    output_dir: str = "runs/default"
    """metrics.jsonl, the resolved config and the graph are written here."""
    steps: int = 100
    """Training steps (one graph execution each)."""
    seed: int = 0
    stop_after: int | None = None
    """End this run after this step, with a checkpoint (job time limits; a later run resumes);
    the schedule still spans run.steps."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir, if any; never; or a
    checkpoint folder (output_dir/checkpoints/step_NNNNNN)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"

    def __post_init__(self) -> None:
        at_least(self, 1, "steps", "stop_after")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    """The built-in task that generates training and held-out prompts (when no files are set)."""
    train_files: list[str] = field(default_factory=list)
    """JSONL or Parquet prompt files to train on (e.g. data/math_train_deepscaler.jsonl); empty: the task."""
    eval_files: list[str] = field(default_factory=list)
    """JSONL or Parquet held-out files for eval/accuracy (e.g. data/math500.jsonl); empty: the task's split."""
    format: PromptFormat = field(default_factory=PromptFormat)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    prompts_per_step: int = 64
    """Prompts per step over all ranks (each yields rollout.n samples); divisible by world size."""
    max_prompt_len: int = 512
    """Longer prompts are dropped (and counted)."""
    shuffle: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "prompts_per_step", "max_prompt_len")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    every: int = 10
    """Evaluate held-out accuracy every this many steps (and before step 1 and after the last);
    0: only before and after."""
    batch_size: int = 256
    """Prompts per generate call on each rank."""
    max_new_tokens: int | None = None
    """None: rollout.max_new_tokens."""
    benchmarks: list[str] = field(default_factory=list)
    """Benchmarks (names in data/, e.g. aime24, math500, or JSONL/Parquet paths) for launch.eval,
    and evaluated during training every `every` steps as eval/<name>/<metric>."""
    n: int = 1
    """Samples per problem."""
    k: list[int] = field(default_factory=lambda: [1])
    """k of pass@k, avg@k and maj@k (each <= n)."""
    temperature: float = 0.0
    """Sampling temperature for benchmarks (0: greedy; DeepSeek-R1 reports 0.6 with top_p 0.95)."""
    top_p: float = 1.0
    rounds: int = 1
    """Multi-round thinking: re-ask with the previous round's final answer this many times."""
    checkpoint: str | None = None
    """launch.eval: a checkpoints/step_* folder to evaluate instead of model.path's weights."""

    def __post_init__(self) -> None:
        at_least(self, 0, "every", "temperature")
        at_least(self, 1, "batch_size", "max_new_tokens", "n", "rounds")
        between(self, 0, 1, "top_p")
        above(self, 0, "top_p")
        for k in self.k:
            if not 1 <= k <= self.n:
                raise RangeError("k", f"a list of values in [1, n={self.n}]", self.k)


@dataclass(kw_only=True, slots=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=GRPOConfig)
    """The algorithm slot: `algorithm.name` picks its Config (the preset), e.g. DAPOConfig."""
    actor: Actor.Config = field(default_factory=Actor.Config)
    critic: Critic.Config = field(default_factory=Critic.Config)
    """Built only by algorithms with a critic (ppo, orz, vapo)."""
    reference: Reference.Config = field(default_factory=Reference.Config)
    """Built only when a KL term needs it."""
    rollout: Rollout.Config = field(default_factory=Rollout.Config)
    reward: Reward.Config = field(default_factory=Reward.Config)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
