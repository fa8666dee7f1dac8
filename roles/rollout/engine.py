"""The rollout engine interface, its requests, sampling parameters, config slot and registry.

Token in, token out: an engine takes `Request`s (prompt ids, optionally tokens already generated
to continue after: a partial rollout, sampling parameters with the request's own seed) and
returns `Completion`s (new token ids, their log-probs, why they ended). Batching, continuous
batching and the KV cache are the engine's business. `generate` is the batch form the rollout
role and evaluation use (B prompts x n samples, sample i of the batch seeded
`request_seed(seed, i)`).

An engine owns a copy of the policy weights in its own layout and dtype; the actor streams fresh
weights into it with `load_weights` at every TRAIN -> GENERATE switch (see core/hybrid.py).
Each engine registers its Config (`@register_engine("torch")` on an `EngineConfig` subclass),
which builds it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

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

    def same_distribution(self, other: SamplingParams) -> bool:
        """Whether both sample alike (temperature, truncation, stop tokens), seeds and budgets aside."""
        return (self.temperature, self.top_p, self.top_k, self.stop_token_ids) == \
            (other.temperature, other.top_p, other.top_k, other.stop_token_ids)


@dataclass(frozen=True, slots=True)
class Request:
    """One sample to generate."""
    prompt: tuple[int, ...]
    """Prompt token ids, no padding (may be empty: an unconditional sample)."""
    sampling: SamplingParams
    """Its sampling: `seed` is this request's own; `max_new_tokens` counts `prefix` too; n = 1."""
    prefix: tuple[int, ...] = ()
    """Response tokens already generated (a paused partial rollout): the engine continues after
    them; only the new tokens come back."""

    def __post_init__(self) -> None:
        if self.sampling.n != 1:
            raise ValueError(f"a request is one sample (sampling.n = 1), got n={self.sampling.n}")
        if len(self.prefix) >= self.sampling.max_new_tokens:
            raise ValueError(f"a prefix of {len(self.prefix)} tokens leaves nothing of max_new_tokens="
                             f"{self.sampling.max_new_tokens} to generate")


FinishReason = Literal["stop", "length", "paused"]


@dataclass(frozen=True, slots=True)
class Completion:
    tokens: tuple[int, ...]
    """The tokens this call generated (after the request's prefix)."""
    logp: tuple[float, ...]
    """Log-prob of each of them under the engine's policy (logits / T)."""
    finish_reason: FinishReason
    """stop (a stop token, included in tokens), length (max_new_tokens reached) or paused
    (the call stopped early: continue it with prefix = prefix + tokens)."""


PauseRule = Callable[[Sequence[int]], bool]
"""Called with the indices of the requests completed so far; True pauses every other request."""


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

    pad_token_id: int

    def generate_requests(self, requests: Sequence[Request], *, pause: PauseRule | None = None
                          ) -> list[Completion]:
        """One completion per request, in order. All requests of a call sample alike (see
        `SamplingParams.same_distribution`); seeds and budgets are per request."""
        raise NotImplementedError

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams) -> Generation:
        """B left-padded prompts x sampling.n samples (adjacent), sample i seeded
        request_seed(sampling.seed, i)."""
        requests = batch_requests(prompt_ids, prompt_mask, sampling)
        return to_generation(self.generate_requests(requests), self.pad_token_id, device=prompt_ids.device)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (name, full tensor) pairs into the engine; returns the bytes received."""
        raise NotImplementedError

    def work_stats(self) -> dict[str, float]:
        """What the last generate call computed, where the engine measures it: tokens produced,
        row_steps computed, useful_frac = tokens / row_steps. Empty where it does not."""
        return {}

    def begin_weight_update(self) -> None:
        """Before a sync's first bucket (SGLang: its weight memory comes back)."""

    def end_weight_update(self, version: int = 0) -> None:
        """After a sync's last bucket; the weights are now the actor's `version` (optimizer
        steps taken). SGLang: prefix cache flushed."""

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


_MASK64 = (1 << 64) - 1


def request_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a batch generated with `seed` (SplitMix64 over both; 63 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def batch_requests(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams) -> list[Request]:
    """The requests of B left-padded prompts x sampling.n samples, sample i seeded
    request_seed(sampling.seed, i)."""
    one = dataclasses.replace(sampling, n=1)
    prompts = [tuple(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    return [Request(prompt=p, sampling=one.with_seed(request_seed(sampling.seed, i * sampling.n + j)))
            for i, p in enumerate(prompts) for j in range(sampling.n)]


def to_generation(completions: Sequence[Completion], pad_token_id: int, *, device: torch.device) -> Generation:
    """Completions as right-padded [N, R] tensors (R = the longest)."""
    width = max((len(c.tokens) for c in completions), default=0) or 1
    ids = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    logp = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, c in enumerate(completions):
        n = len(c.tokens)
        ids[i, :n] = torch.tensor(c.tokens, dtype=torch.long)
        mask[i, :n] = 1
        logp[i, :n] = torch.tensor(c.logp, dtype=torch.float32)
    return Generation(ids.to(device), mask.to(device), logp.to(device), [c.finish_reason for c in completions])


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
