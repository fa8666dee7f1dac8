"""The `torch` rollout engine: sampling with a KV cache for any HF causal LM, request by request.

The engine keeps its own full (unsharded) copy of the policy in the engine dtype and serves
`Request`s (roles/rollout/engine.py) with one of two schedulers:

* **continuous** (the default with a growing cache: CPU, and GPU with static_cache=false): a
  bounded set of running rows (`max_running`) shares one `DynamicCache`. Finished rows leave (the
  cache is compacted once an eighth of the rows are done), waiting requests join when a quarter
  of the slots are free (their prefill is merged into the cache, left-padded to its length, and
  left columns every row pads are trimmed), so compute follows the tokens actually produced
  instead of every row running until the longest is done. Requests admitted together with the
  same prompt (a GRPO group's n samples) are prefilled once. A `pause` rule ends the call early:
  unfinished requests come back as "paused" with the tokens they have (partial rollouts).
* **lockstep** (static cache: the default on CUDA, and with compile): every request is admitted
  at once, left-padded, and runs until all are done, on a preallocated `StaticCache` of fixed
  shape kept between the calls of a generation phase (freed when training takes the device),
  optionally with a compiled decode step (torch.compile; CUDA graphs with mode
  "reduce-overhead"). The compiled path has not run on a GPU yet (docs/gpu.md).

Both sample with per-request randomness (roles/rollout/sampling.py), so a request's tokens do not
depend on the scheduler or on the other requests (up to the float rounding of differently shaped
batches); greedy decoding is argmax.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer

from core.config import at_least
from core.models import cache_kwarg
from roles.rollout.engine import (
    Completion,
    Engine,
    EngineConfig,
    EngineContext,
    PauseRule,
    Request,
    SamplingParams,
    register_engine,
)
from roles.rollout.sampling import sample_next

logger = logging.getLogger(__name__)


@register_engine("torch")
@dataclass(kw_only=True, slots=True)
class TorchEngineConfig(EngineConfig):
    name: str = "torch"
    static_cache: bool | None = None
    """Preallocated KV cache of fixed shape (transformers StaticCache) instead of a growing one;
    None: on CUDA only. Needed for compile."""
    compile: bool = False
    """torch.compile the one-token decode step (with CUDA graphs on CUDA: mode
    "reduce-overhead"); compiled once per (batch, cache length) shape. Implies static_cache."""
    cache_len_multiple: int = 64
    """Prompts are left-padded, and the static cache length (prompt + max_new_tokens) rounded
    up, to a multiple of this, so compiled shapes repeat across steps (torch.compile gives up
    after 8 shapes per function)."""
    max_running: int = 512
    """Continuous scheduler: requests generated at once (a bound on the KV cache's rows)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "cache_len_multiple", "max_running")

    def build(self, ctx: EngineContext) -> TorchEngine:
        return TorchEngine(ctx.policy(), pad_token_id=ctx.pad_token_id, device=ctx.device, dtype=ctx.dtype,
                           options=self)


class TorchEngine(Engine):
    def __init__(self, model: PreTrainedModel, *, pad_token_id: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, options: TorchEngineConfig | None = None,
                 share_prefill: bool = True) -> None:
        # transformers wraps PreTrainedModel.to in a decorator mypy misreads
        self.model = model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.device = device
        self._params = dict(self.model.named_parameters())
        self._cache_kwarg = cache_kwarg(self.model)
        self.share_prefill = share_prefill
        """Continuous scheduler: requests admitted together with the same prompt (and prefix) are
        prefilled once and their cache rows copied, as SGLang's prefix cache serves a GRPO group's
        n samples (the same tokens: tests/test_shared_prompts.py); False only for that test."""
        opts = options or TorchEngineConfig()
        self.opts = opts
        self.static = opts.compile or (opts.static_cache if opts.static_cache is not None
                                       else device.type == "cuda")
        self._cache: tuple[tuple[int, int], StaticCache] | None = None
        self.last_stats: dict[str, float] = {}
        """tokens, row_steps and useful_frac of the last generate call."""
        self._decode: Callable[..., torch.Tensor] = self._forward
        if opts.compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._decode = torch.compile(self._forward, dynamic=False, mode=mode)

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._params.items()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        received = 0
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"engine has no parameter {name!r}")
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: engine shape {tuple(param.shape)} != {tuple(tensor.shape)}")
            param.copy_(tensor)
            received += tensor.numel() * tensor.element_size()
        return received

    def work_stats(self) -> dict[str, float]:
        return self.last_stats

    def sleep(self) -> None:
        # A growing KV cache lives only inside generate(); a static one is kept between calls
        # of a phase (its shape repeats) and freed here, when training takes the device.
        self._cache = None

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate_requests(self, requests: Sequence[Request], *, pause: PauseRule | None = None
                          ) -> list[Completion]:
        if not requests:
            return []
        sampling = requests[0].sampling
        if not all(r.sampling.same_distribution(sampling) for r in requests):
            raise ValueError("the requests of one call must share temperature, top_p, top_k and stop tokens")
        if self.static:
            if pause is not None:
                raise ValueError("pausing (partial rollouts) needs the continuous scheduler: "
                                 "rollout.engine.static_cache=false")
            return self._lockstep(requests, sampling)
        return _Continuous(self, requests, sampling, pause).run()

    def _lockstep(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        """Every request at once on a static cache of fixed shape (see the module docstring)."""
        N = len(requests)
        ids_NP, mask_NP = self._left_padded([r.prompt + r.prefix for r in requests])
        if ids_NP.shape[1] % self.opts.cache_len_multiple:
            # left-pad prompts to a multiple too, so the cache length (and the compiled decode
            # step's shapes) repeat across batches with different prompt lengths
            extra = self.opts.cache_len_multiple - ids_NP.shape[1] % self.opts.cache_len_multiple
            ids_NP = torch.nn.functional.pad(ids_NP, (extra, 0), value=self.pad_token_id)
            mask_NP = torch.nn.functional.pad(mask_NP, (extra, 0), value=0)
        P = ids_NP.shape[1]
        budget = max(r.sampling.max_new_tokens - len(r.prefix) for r in requests)
        pos_NP = (mask_NP.cumsum(-1) - 1).clamp(min=0)
        # Fixed shapes: the mask spans the whole cache (future slots 0) and each decode step
        # writes slot P + t, so every step after the prefill has the same shapes.
        cache, length = self._static_cache(N, P + budget)
        attn = torch.zeros((N, length), dtype=torch.long, device=self.device)
        attn[:, :P] = mask_NP
        logits_NV = self._forward(ids_NP, attn, pos_NP, cache, torch.arange(P, device=self.device))
        next_pos_N1 = pos_NP[:, -1:] + 1
        rows = _Rows(requests, self.device)
        for t in range(budget):
            tok_N = rows.sample(logits_NV, sampling, range(N))
            if rows.all_done():
                break
            slot = P + t
            attn[:, slot] = 1
            logits_NV = self._decode(tok_N[:, None], attn, next_pos_N1, cache,
                                     torch.tensor([slot], device=self.device)).clone()
            next_pos_N1 = next_pos_N1 + 1
        self.last_stats = rows.stats()
        return rows.completions()

    def _left_padded(self, seqs: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(q) for q in seqs))  # an empty prompt is one masked pad
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, width - len(q):] = torch.tensor(q, dtype=torch.long)
            mask[i, width - len(q):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | StaticCache, cache_position: torch.Tensor | None = None
                 ) -> torch.Tensor:
        extra: dict[str, Any] = {self._cache_kwarg: cache}
        if cache_position is not None:
            extra["cache_position"] = cache_position
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **extra)
        return out.logits[:, -1].float()

    def _static_cache(self, n: int, length: int) -> tuple[StaticCache, int]:
        """The kept cache for (n rows, length rounded up), reset; a new one for a new shape."""
        m = self.opts.cache_len_multiple
        length = -(-length // m) * m
        if self._cache is not None and self._cache[0] == (n, length):
            self._cache[1].reset()
            return self._cache[1], length
        self._cache = None  # free the old one first
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        self._cache = ((n, length), cache)
        return cache, length


class _Rows:
    """Per-request bookkeeping of one call: tokens and log-probs so far, done flags, seeds and
    each request's next response index (for the sampler's stream)."""

    def __init__(self, requests: Sequence[Request], device: torch.device) -> None:
        self.requests = requests
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logps: list[list[float]] = [[] for _ in requests]
        self.reason: list[str | None] = [None] * len(requests)
        self.seed = torch.tensor([r.sampling.seed for r in requests], dtype=torch.long, device=device)
        self.row_steps = 0
        """Rows sampled, summed over steps (a done row still waiting for eviction counts)."""
        self.stops = torch.tensor(requests[0].sampling.stop_token_ids or (-1,), dtype=torch.long, device=device)
        self.done_order: list[int] = []

    def all_done(self) -> bool:
        return all(r is not None for r in self.reason)

    def sample(self, logits_NV: torch.Tensor, sampling: SamplingParams, which: Sequence[int]) -> torch.Tensor:
        """Sample the next token of requests `which` (one per row of logits_NV); rows of done
        requests are sampled too (they still hold a cache row) but their tokens are dropped."""
        index = torch.tensor(list(which), dtype=torch.long, device=self.seed.device)
        step = torch.tensor([len(self.requests[i].prefix) + len(self.tokens[i]) for i in which],
                            dtype=torch.long, device=self.seed.device)
        tok_N, logp_N = sample_next(logits_NV, sampling, self.seed[index], step)
        self.row_steps += len(index)
        stopped = torch.isin(tok_N, self.stops).tolist()
        for row, (i, tok, lp) in enumerate(zip(which, tok_N.tolist(), logp_N.tolist())):
            if self.reason[i] is not None:
                continue
            self.tokens[i].append(tok)
            self.logps[i].append(lp)
            if stopped[row]:
                self.reason[i] = "stop"
            elif len(self.requests[i].prefix) + len(self.tokens[i]) >= self.requests[i].sampling.max_new_tokens:
                self.reason[i] = "length"
            if self.reason[i] is not None:
                self.done_order.append(i)
        return tok_N

    def stats(self) -> dict[str, float]:
        """tokens produced, rows computed, and their ratio (the useful fraction of the work)."""
        tokens = sum(len(t) for t in self.tokens)
        return {"tokens": float(tokens), "row_steps": float(self.row_steps),
                "useful_frac": tokens / max(self.row_steps, 1)}

    def completions(self) -> list[Completion]:
        return [Completion(tuple(t), tuple(lp), r or "paused")  # type: ignore[arg-type]
                for t, lp, r in zip(self.tokens, self.logps, self.reason)]


class _Continuous:
    """The continuous scheduler of one call (see the module docstring)."""

    def __init__(self, engine: TorchEngine, requests: Sequence[Request], sampling: SamplingParams,
                 pause: PauseRule | None) -> None:
        self.engine, self.sampling, self.pause = engine, sampling, pause
        self.rows = _Rows(requests, engine.device)
        self.waiting = deque(range(len(requests)))
        self.limit = engine.opts.max_running
        self.running: list[int] = []
        self.cache: DynamicCache | None = None
        self.attn = torch.zeros((0, 0), dtype=torch.long, device=engine.device)
        self.next_pos = torch.zeros((0, 1), dtype=torch.long, device=engine.device)
        self.logits: torch.Tensor | None = None

    def run(self) -> list[Completion]:
        completed = 0
        while self.waiting or self.running:
            free = self.limit - len(self.running)
            if self.waiting and (not self.running or free >= max(1, self.limit // 4)):
                self._admit([self.waiting.popleft() for _ in range(min(free, len(self.waiting)))])
            assert self.logits is not None
            tok_N = self.rows.sample(self.logits, self.sampling, self.running)
            if len(self.rows.done_order) > completed:
                completed = len(self.rows.done_order)
                if self.pause is not None and self.pause(self.rows.done_order):
                    break
            done = [self.rows.reason[i] is not None for i in self.running]
            if all(done) and not self.waiting:
                break
            if sum(done) >= max(1, len(self.running) // 8) or all(done):
                tok_N = self._evict(done, tok_N)
            if self.running:
                self._step(tok_N)
        self.engine.last_stats = self.rows.stats()
        return self.rows.completions()

    def _admit(self, new: list[int]) -> None:
        """Prefill `new` (prompt + prefix, left-padded) and merge them into the running cache.
        Requests with the same prompt and prefix (a GRPO group's n samples) are prefilled once
        and their cache rows copied."""
        eng = self.engine
        seqs = [self.rows.requests[i].prompt + self.rows.requests[i].prefix for i in new]
        distinct = list(dict.fromkeys(seqs)) if eng.share_prefill else seqs
        ids, mask = eng._left_padded(distinct)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=eng.model.config)
        logits = eng._forward(ids, mask, pos, cache)
        if len(distinct) < len(seqs):
            where = {s: k for k, s in enumerate(distinct)}
            index = torch.tensor([where[s] for s in seqs], dtype=torch.long, device=ids.device)
            for layer in _kv_layers(cache):
                layer.batch_select_indices(index)
            ids, mask, pos, logits = ids[index], mask[index], pos[index], logits[index]
        if self.cache is None or not self.running:
            self.cache, self.attn, self.next_pos, self.logits = cache, mask, pos[:, -1:] + 1, logits
        else:
            width = max(self.attn.shape[1], mask.shape[1])
            _merge_caches(self.cache, cache, width)
            self.attn = torch.cat([_pad_left(self.attn, width), _pad_left(mask, width)])
            self.next_pos = torch.cat([self.next_pos, pos[:, -1:] + 1])
            assert self.logits is not None
            self.logits = torch.cat([self.logits, logits])
        self.running = self.running + new

    def _evict(self, done: list[bool], tok_N: torch.Tensor) -> torch.Tensor:
        """Drop the rows of finished requests, and left columns every remaining row pads."""
        keep = [k for k, d in enumerate(done) if not d]
        self.running = [self.running[k] for k in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.attn.device)
        if self.cache is not None and keep:
            self.cache.batch_select_indices(index)
        self.attn, self.next_pos = self.attn[index], self.next_pos[index]
        if keep:
            first = int(self.attn.any(0).nonzero()[0])
            if first > 0:
                self.attn = self.attn[:, first:]
                _crop_left(self.cache, first)
        return tok_N[index]

    def _step(self, tok_N: torch.Tensor) -> None:
        """One decode step of every running row."""
        assert self.cache is not None
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        self.logits = self.engine._forward(tok_N[:, None], self.attn, self.next_pos, self.cache)
        self.next_pos = self.next_pos + 1


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's full-attention layers (keys/values [rows, heads, positions, dim]); other
    layer kinds (sliding windows, linear attention) are refused: their state is not a plain
    per-position tensor the scheduler may pad, select and crop."""
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise NotImplementedError(f"continuous batching needs full-attention KV cache layers, not "
                                      f"{type(layer).__name__}: set rollout.engine.static_cache=true")
        layers.append(layer)
    return layers


def _merge_caches(into: DynamicCache, new: DynamicCache, width: int) -> None:
    """Append `new`'s rows to `into`, both left-padded along the sequence to `width`."""
    for mine, theirs in zip(_kv_layers(into), _kv_layers(new)):
        assert mine.keys is not None and mine.values is not None and theirs.keys is not None \
            and theirs.values is not None
        mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
        mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])


def _crop_left(cache: DynamicCache | None, columns: int) -> None:
    """Drop the first `columns` positions of every layer (padding of every row)."""
    if cache is None:
        return
    for layer in _kv_layers(cache):
        assert layer.keys is not None and layer.values is not None
        layer.keys = layer.keys[:, :, columns:]
        layer.values = layer.values[:, :, columns:]
