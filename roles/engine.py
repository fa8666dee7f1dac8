"""The rollout engine interface, its sampling parameters, and the engine registry.

An engine turns left-padded prompt token ids into sampled responses. It owns a copy of the
policy weights in its own layout and dtype; the actor streams fresh weights into it with
`load_weights` at every TRAIN -> GENERATE switch (see core/hybrid.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

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


@dataclass(frozen=True, slots=True)
class Generation:
    """Engine output for B prompts x n samples (N = B*n rows)."""
    response_ids: torch.Tensor   # [N, R] long, right-padded with the pad id
    response_mask: torch.Tensor  # [N, R] long, 1 on generated tokens incl. the stop token
    logp: torch.Tensor           # [N, R] float32, log-prob of each sampled token (logits / T)
    finish_reason: list[str]     # N x ("stop" | "length")


class Engine(Protocol):
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams) -> Generation: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (name, full tensor) pairs into the engine; returns the bytes received."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


ENGINES: Registry[Callable[..., Engine]] = Registry("rollout engine")
register_engine = ENGINES.register
get_engine = ENGINES.get
