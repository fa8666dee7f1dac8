"""The `torch` rollout engine: batched sampling with a KV cache for any HF causal LM.

The engine keeps its own full (unsharded) copy of the policy in the engine dtype. Prompts are
left-padded, so every row's next token is at the last column and one forward per new token
serves the whole batch; a `DynamicCache` holds keys and values between steps. Finished rows keep
running (padding) until every row is done, which is cheaper than reshaping the cache for the
short responses RL produces on CPU.

On GPU (`rollout.torch_engine`): a static KV cache (fixed shapes, kept between calls of a
generation phase, freed when training takes the device) and optionally a compiled decode step
(torch.compile; CUDA graphs with mode "reduce-overhead"). Static and growing caches give the
same tokens (tests/test_engine.py); the compiled path has not run on a GPU yet (docs/gpu.md).

Log-probs: the engine reports log softmax(logits / T) of the sampled token, before top-k/top-p
truncation (the convention of verl and OpenRLHF), which is exactly what the actor recomputes.
Greedy decoding (T = 0) reports log softmax(logits).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from core.config import at_least
from roles.rollout.engine import Engine, EngineConfig, EngineContext, Generation, SamplingParams, register_engine

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

    def __post_init__(self) -> None:
        at_least(self, 1, "cache_len_multiple")

    def build(self, ctx: EngineContext) -> TorchEngine:
        return TorchEngine(ctx.policy(), pad_token_id=ctx.pad_token_id, device=ctx.device, dtype=ctx.dtype,
                           options=self)


class TorchEngine(Engine):
    def __init__(self, model: PreTrainedModel, *, pad_token_id: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, options: TorchEngineConfig | None = None) -> None:
        # transformers wraps PreTrainedModel.to in a decorator mypy misreads
        self.model = model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.device = device
        self._params = dict(self.model.named_parameters())
        # transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name
        # warns); 5.17 knows only the old one.
        forward = inspect.signature(type(self.model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        opts = options or TorchEngineConfig()
        self.opts = opts
        self.static = opts.compile or (opts.static_cache if opts.static_cache is not None
                                       else device.type == "cuda")
        self._cache: tuple[tuple[int, int], StaticCache] | None = None
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

    def sleep(self) -> None:
        # A growing KV cache lives only inside generate(); a static one is kept between calls
        # of a phase (its shape repeats) and freed here, when training takes the device.
        self._cache = None

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingParams) -> Generation:
        ids_NP = prompt_ids.to(self.device).repeat_interleave(sampling.n, dim=0)
        mask_NP = prompt_mask.to(self.device).long().repeat_interleave(sampling.n, dim=0)
        N = ids_NP.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        stop = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=self.device)

        if self.static and ids_NP.shape[1] % self.opts.cache_len_multiple:
            # left-pad prompts to a multiple too, so the cache length (and the compiled decode
            # step's shapes) repeat across batches with different prompt lengths
            extra = self.opts.cache_len_multiple - ids_NP.shape[1] % self.opts.cache_len_multiple
            ids_NP = torch.nn.functional.pad(ids_NP, (extra, 0), value=self.pad_token_id)
            mask_NP = torch.nn.functional.pad(mask_NP, (extra, 0), value=0)
        P = ids_NP.shape[1]
        pos_NP = (mask_NP.cumsum(-1) - 1).clamp(min=0)
        if self.static:
            # Fixed shapes: the mask spans the whole cache (future slots 0) and each decode step
            # writes slot P + t, so every step after the prefill has the same shapes.
            cache: DynamicCache | StaticCache
            cache, length = self._static_cache(N, P + sampling.max_new_tokens)
            attn = torch.zeros((N, length), dtype=torch.long, device=self.device)
            attn[:, :P] = mask_NP
            logits_NV = self._forward(ids_NP, attn, pos_NP, cache,
                                      torch.arange(P, device=self.device))
        else:
            cache = DynamicCache(config=self.model.config)
            attn = mask_NP
            logits_NV = self._forward(ids_NP, mask_NP, pos_NP, cache)
        next_pos_N1 = pos_NP[:, -1:] + 1

        tokens, logps, masks = [], [], []
        done_N = torch.zeros(N, dtype=torch.bool, device=self.device)
        for _ in range(sampling.max_new_tokens):
            tok_N, logp_N = sample_next(logits_NV, sampling, gen)
            tok_N = torch.where(done_N, torch.full_like(tok_N, self.pad_token_id), tok_N)
            tokens.append(tok_N)
            logps.append(torch.where(done_N, torch.zeros_like(logp_N), logp_N))
            masks.append((~done_N).long())
            done_N = done_N | torch.isin(tok_N, stop)
            if bool(done_N.all()):
                break
            if self.static:
                slot = P + len(tokens) - 1
                attn[:, slot] = 1
                logits_NV = self._decode(tok_N[:, None], attn, next_pos_N1, cache,
                                         torch.tensor([slot], device=self.device)).clone()
            else:
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                logits_NV = self._forward(tok_N[:, None], attn, next_pos_N1, cache)
            next_pos_N1 = next_pos_N1 + 1

        response_mask = torch.stack(masks, dim=1)
        finish = ["stop" if d else "length" for d in done_N.tolist()]
        return Generation(torch.stack(tokens, dim=1), response_mask,
                          torch.stack(logps, dim=1).float(), finish)

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


def sample_next(logits_NV: torch.Tensor, sampling: SamplingParams,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under softmax(logits / T) (T = 1 when greedy)."""
    if sampling.temperature == 0:
        tok_N = logits_NV.argmax(-1)
        logp_NV = logits_NV.log_softmax(-1)
    else:
        scaled = logits_NV / sampling.temperature
        logp_NV = scaled.log_softmax(-1)
        tok_N = torch.multinomial(truncate(scaled, sampling).softmax(-1), 1, generator=gen)[:, 0]
    return tok_N, logp_NV.gather(-1, tok_N[:, None])[:, 0]


def truncate(logits_NV: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; removed tokens get -inf."""
    out = logits_NV
    if 0 < sampling.top_k < out.shape[-1]:
        kth = out.topk(sampling.top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out
