"""The rollout engine interface, its sampling parameters, its config slot and registry.

An engine turns left-padded prompt token ids into sampled responses. It owns a copy of the
policy weights in its own layout and dtype; the actor streams fresh weights into it with
`load_weights` at every TRAIN -> GENERATE switch (see core/hybrid.py). Each engine registers
its Config (`@register_engine("torch")` on an `EngineConfig` subclass), which builds it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from transformers import PreTrainedModel

from core.config import Slot
from core.registry import Registry


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_new_tokens: int = 16
    n: int = 1
    """Samples per prompt; the n samples of a prompt are adjacent in the output."""
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be >= 1")

    def with_seed(self, seed: int) -> SamplingParams:
        return dataclasses.replace(self, seed=seed)


@dataclass(frozen=True, slots=True)
class Generation:
    """Engine output for B prompts x n samples (N = B*n rows)."""
    response_ids: torch.Tensor   # [N, R] long, right-padded with the pad id
    response_mask: torch.Tensor  # [N, R] long, 1 on generated tokens incl. the stop token
    logp: torch.Tensor           # [N, R] float32, log-prob of each sampled token (logits / T)
    finish_reason: list[str]     # N x ("stop" | "length")


class Engine:
    """What the rollout role and the hybrid engine call: the base of every engine, so the no-op
    defaults below are an engine's unless it overrides them."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams) -> Generation:
        raise NotImplementedError

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (name, full tensor) pairs into the engine; returns the bytes received."""
        raise NotImplementedError

    def begin_weight_update(self) -> None:
        """Before a sync's first bucket (SGLang: its weight memory comes back)."""

    def end_weight_update(self) -> None:
        """After a sync's last bucket (SGLang: prefix cache flushed, KV cache back)."""

    @property
    def needs_full_sync(self) -> bool:
        """The engine lost its weights (SGLang after sleep): sync even if the actor did not step."""
        return False

    def sleep(self) -> None:
        """Training takes the device: free what generation holds (KV cache, ...)."""

    def wake(self) -> None:
        """Generation takes the device back."""

    def shutdown(self) -> None:
        """Release the engine's processes and memory for good."""


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What an engine is built from, besides its own config."""
    policy: Callable[[], PreTrainedModel]
    """Builds the engine's own full copy of the policy (engines that load model_path ignore it)."""
    model_path: str | None
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    seed: int


@dataclass(kw_only=True, slots=True)
class EngineConfig(Slot):
    """The `rollout.engine` slot: `name` picks the engine, its Config subclass holds its options
    (`rollout.engine=sglang rollout.engine.tp_size=2`)."""
    name: str = "torch"
    """"torch" (built in; CPU and GPU) or "sglang" (GPU; pip install 'rolegraph[sglang]')."""

    @classmethod
    def variant(cls, name: str) -> type:
        return ENGINES.get(name)

    def build(self, ctx: EngineContext) -> Engine:
        raise NotImplementedError(f"{type(self).__name__} does not build an engine")

    def prepare_process(self) -> None:
        """Called by every entry point before CUDA initialises (e.g. allocator settings)."""


ENGINES: Registry[type[EngineConfig]] = Registry("rollout engine")
"""Engine name -> its Config class (whose `build` makes the engine)."""
register_engine = ENGINES.register
