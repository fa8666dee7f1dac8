"""Causal LMs and tokenizers from local folders or inline configs, and FSDP2 sharding.

Nothing here touches a model hub: `path` must be a local folder (`local_files_only=True`), or
`config` gives an inline Hugging Face config (`model_type` plus its fields) for a model with
random weights, which is what tests use.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from core.batch import Batch, declare_field, model_inputs

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model folder (config.json + safetensors). Takes precedence over `config`."""
    config: dict[str, Any] = field(default_factory=dict)
    """Inline HF config for a randomly initialised model, e.g. {model_type: qwen2, hidden_size: 64}."""
    tokenizer: str | None = None
    """Local tokenizer folder; default: `path`; with neither, the built-in task's tokenizer."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers ("sdpa", "eager", "flash_attention_2")."""
    pad_token_id: int | None = None
    """Padding token id; None: the tokenizer's pad token, or its EOS where it has none (or its pad
    token lies outside the model's vocabulary: the vocabulary never grows)."""


def _check_folder(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {str(p)!r} does not exist (models load from local "
                                f"folders only; there is no hub download)")
    return p


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A causal LM on CPU in `dtype`: from `cfg.path`, else random weights from `cfg.config`
    (seeded, so every rank builds identical weights)."""
    if cfg.path:
        model = _load_folder(_check_folder(cfg.path, "model"), dtype, cfg.attn_implementation)
    else:
        if "model_type" not in cfg.config:
            raise ValueError("model: set `model.path` to a local folder, or `model.config` to an "
                             "inline Hugging Face config with a `model_type` (e.g. qwen2)")
        extra = dict(cfg.config)
        model_type = extra.pop("model_type")
        if vocab_size is not None:
            extra.setdefault("vocab_size", vocab_size)
        hf_config = AutoConfig.for_model(model_type, **extra)
        hf_config._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.config.use_cache = False
    return model


def _load_folder(folder: Path, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """A model folder, strictly: every file readable (a corrupt one is named), every weight of
    the architecture present and none unknown, every value finite; errors name the tensor."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json")
    try:
        json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types, without the path
            raise ValueError(f"{weights}: cannot read the safetensors file ({type(e).__name__}: {e}); "
                             f"truncated or corrupt?") from None
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
            output_loading_info=True)
        model, info = loaded
    except Exception as e:
        raise ValueError(f"cannot load model folder {str(folder)!r}: {type(e).__name__}: {e}") from e
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k) for k in info.get(kind) or ())
        if names:
            more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
            raise ValueError(f"model folder {str(folder)!r}: {kind.replace('_', ' ')} {names[:5]}{more}: "
                             f"its weights do not match the architecture in config.json")
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise ValueError(f"model folder {str(folder)!r}: tensor {name!r} holds "
                             f"{int((~torch.isfinite(t)).sum())} non-finite values")
    return model


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer from `cfg.tokenizer` or `cfg.path`; None when neither is set (the caller
    then uses its built-in task's tokenizer). Its pad token is `cfg.pad_token_id`, else its own
    if the model's vocabulary holds it, else EOS: the vocabulary never grows."""
    src = cfg.tokenizer or cfg.path
    if src is None:
        return None
    folder = _check_folder(src, "tokenizer" if cfg.tokenizer else "model")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer in {str(folder)!r}: {type(e).__name__}: {e}") from e
    vocab = _model_vocab_size(cfg) or len(tok)
    if cfg.pad_token_id is not None:
        if not 0 <= cfg.pad_token_id < vocab:
            raise ValueError(f"model.pad_token_id={cfg.pad_token_id} is outside the vocabulary (0..{vocab - 1})")
        tok.pad_token = tok.convert_ids_to_tokens(cfg.pad_token_id)
    elif tok.pad_token_id is None or tok.pad_token_id >= vocab:
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {str(folder)!r} has neither a pad token in the vocabulary "
                             f"nor an EOS token; set model.pad_token_id")
        logger.info("tokenizer %s: pad token %r is %s; padding with EOS %r (id %d)", folder, tok.pad_token,
                    "missing" if tok.pad_token_id is None else f"outside the model's {vocab} tokens",
                    tok.eos_token, tok.eos_token_id)
        tok.pad_token = tok.eos_token
    return tok


def _model_vocab_size(cfg: ModelConfig) -> int | None:
    """The vocabulary size in the model folder's config.json (None without one)."""
    config_file = Path(cfg.path) / "config.json" if cfg.path else None
    if config_file is None or not config_file.exists():
        return None
    size = json.loads(config_file.read_text()).get("vocab_size")
    return int(size) if size is not None else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found through HF's `_no_split_modules` class names."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__} "
                         f"(_no_split_modules={sorted(names)})")
    return layers


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, *,
                param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """FSDP2: one `fully_shard` per decoder layer, then the root (embeddings, norm, head)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


LOGIT_CHUNK_TOKENS = 1024
"""Tokens whose float32 full-vocab logits are materialised at once (x vocab x 4 bytes)."""


def token_logprobs(model: torch.nn.Module, batch: Batch, *, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under `model` with logits / temperature.

    Returns (logp_BR, entropy_BR or None), float32, aligned with batch.response_ids; 0 at
    masked positions. The float32 log-softmax and entropy are computed LOGIT_CHUNK_TOKENS
    tokens at a time under activation checkpointing, so a full [B, R, vocab] float32 tensor
    never exists, in the forward or the backward pass.

    A batch with the field `prompt_group` (set by core.packing.micro_batches) runs each of its
    prompts once (`shared_prompt_logits`): the same numbers up to float rounding, gradients
    included.
    """
    ids, mask, pos = model_inputs(batch)
    B, R = batch.response_ids.shape
    if "prompt_group" in batch:
        logits = shared_prompt_logits(model, ids, mask, pos, PromptGroups.of(batch.prompt_group),
                                      prompt_width=batch.prompt_ids.shape[1])
    else:
        # Only the R positions that predict response tokens go through the LM head.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=R + 1).logits[:, :-1]
    out_N2 = chunked_logp_entropy(logits.reshape(B * R, -1), batch.response_ids.reshape(-1),
                                  temperature=temperature, with_entropy=with_entropy)
    keep = batch.response_mask.bool()
    zero = torch.zeros((), dtype=out_N2.dtype, device=out_N2.device)
    logp_BR = torch.where(keep, out_N2[:, 0].reshape(B, R), zero)
    entropy_BR = torch.where(keep, out_N2[:, 1].reshape(B, R), zero) if with_entropy else None
    return logp_BR, entropy_BR


declare_field("prompt_group", shape="B", doc="the sample's prompt among its micro-batch's distinct "
              "prompts (0..G-1): set where the micro-batch runs each prompt once (core.models.shared_prompt_logits)")


@dataclass(frozen=True, slots=True)
class PromptGroups:
    """Rows of a padded batch with identical prompts (ids and mask): `first` [G] holds one row
    of each distinct prompt, `inverse` [B] the group (0..G-1) of every row."""
    first: torch.Tensor
    inverse: torch.Tensor

    @staticmethod
    def of(inverse: torch.Tensor) -> PromptGroups:
        G = int(inverse.max()) + 1 if len(inverse) else 0
        rows = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((G,), len(inverse), dtype=torch.long, device=inverse.device).scatter_reduce(
            0, inverse, rows, reduce="amin")
        return PromptGroups(first=first, inverse=inverse)


def prompt_groups(batch: Batch) -> PromptGroups:
    """The batch's distinct prompts (G = B when no two rows share one)."""
    key = torch.cat([batch.prompt_ids, batch.prompt_mask.to(batch.prompt_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    return PromptGroups.of(inverse)


def shared_prompt_tokens(G: int, B: int, P: int, R: int) -> int:
    """Token slots of `shared_prompt_logits` on a [B, P + R] padded batch with G distinct prompts."""
    return G * P + B * max(R - 1, 0)


def _hf_model(model: torch.nn.Module) -> PreTrainedModel:
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face model")
    return hf


def cache_kwarg(model: PreTrainedModel) -> str:
    """The forward's KV-cache argument: transformers 5.2x renamed `past_key_values` to `cache`
    (the old name warns); 5.17 knows only the old one."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def full_attention_only(model: torch.nn.Module) -> bool:
    """Whether every layer keeps a plain full-attention KV cache (what `shared_prompt_logits`
    indexes); sliding-window, linear-attention and hybrid layers do not."""
    config = _hf_model(model).config
    types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types)


def shared_prompt_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                         groups: PromptGroups, *, prompt_width: int) -> torch.Tensor:
    """[B, R, V] logits predicting the R response tokens of model_inputs' (ids, mask, pos), with
    each distinct prompt computed once: its forward fills a KV cache of G rows, which is indexed
    out to the B rows (the backward pass sums the B rows' gradients into the G prompts, what the
    full forward computes row by row), and the responses run on it. The first response token is
    predicted by the prompt's last position; the last response token predicts nothing, so it is
    not an input. Needs a full-attention KV cache (transformers' DynamicCache) and no activation
    checkpointing (which drops the cache in training mode)."""
    P = prompt_width
    R = ids.shape[1] - P
    hf = _hf_model(model)
    cache = DynamicCache(config=hf.config)
    kw = {cache_kwarg(hf): cache}
    g = groups.first
    first = model(input_ids=ids[g, :P], attention_mask=mask[g, :P], position_ids=pos[g, :P], use_cache=True,
                  logits_to_keep=1, **kw).logits[groups.inverse]
    if R == 1:
        return first
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise NotImplementedError(f"shared prompts need full-attention KV cache layers, not "
                                      f"{type(layer).__name__} (callers check full_attention_only first)")
        # index_select: its backward (index_add) is far cheaper on the CPU than indexing's (index_put)
        layer.keys = layer.keys.index_select(0, groups.inverse)
        layer.values = layer.values.index_select(0, groups.inverse)
    rest = model(input_ids=ids[:, P:-1], attention_mask=mask[:, :-1], position_ids=pos[:, P:-1], use_cache=True,
                 **kw).logits
    return torch.cat([first, rest], dim=1)


def packed_logprobs(model: torch.nn.Module, ids_BL: torch.Tensor, pos_BL: torch.Tensor
                    ) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) as [B, L-1] float32, for rows of packed sequences (SFT).

    Position ids restart at 0 where a sequence starts; with no attention mask, transformers
    builds a block-diagonal causal mask from them (one sequence never attends to another).
    Entries that predict the first token of a sequence are meaningless; callers mask them.
    """
    B, L = ids_BL.shape
    logits = model(input_ids=ids_BL, position_ids=pos_BL, use_cache=False).logits[:, :-1]
    out_N2 = chunked_logp_entropy(logits.reshape(B * (L - 1), -1), ids_BL[:, 1:].reshape(-1))
    return out_N2[:, 0].reshape(B, L - 1)


def packed_token_logprobs(model: torch.nn.Module, ids_BL: torch.Tensor, pos_BL: torch.Tensor, *,
                          keep_K: torch.Tensor, pick_N: torch.Tensor, targets_N: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False) -> torch.Tensor:
    """[N, 2] (log-prob, entropy) of N chosen next tokens of packed rows (RL; core/packing.py).

    The rows are packed as for `packed_logprobs`. Only the columns `keep_K` go through the LM
    head (the positions that predict a response token, in some row); `pick_N` indexes the
    flattened [B * K] positions kept, and `targets_N` holds the token each one predicts.
    """
    logits_BKV = model(input_ids=ids_BL, position_ids=pos_BL, use_cache=False, logits_to_keep=keep_K).logits
    logits_NV = logits_BKV.reshape(-1, logits_BKV.shape[-1])[pick_N]
    return chunked_logp_entropy(logits_NV, targets_N, temperature=temperature, with_entropy=with_entropy)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention kernels that run packed sequences as variable-length batches (cost: the sum of the
squared sequence lengths). The others (sdpa, eager) apply a dense block-diagonal mask over a row,
so packed rows are kept as short as the longest sample."""


def varlen_attention(model: torch.nn.Module) -> bool:
    """Whether `model` attends with a variable-length kernel (one packed row is then cheapest)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in VARLEN_ATTENTION


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant; FSDP2's hooks stay outside the
    recomputed region). Applies to the outermost Hugging Face model inside `model`."""
    hf = _hf_model(model)
    if not hf.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def chunked_logp_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, *,
                         temperature: float = 1.0, with_entropy: bool = False) -> torch.Tensor:
    """[N, 2] (log-prob of the target, entropy), LOGIT_CHUNK_TOKENS rows at a time, each chunk
    recomputed in the backward pass (activation checkpointing) when gradients are on."""
    parts = []
    for i in range(0, logits_NV.shape[0], LOGIT_CHUNK_TOKENS):
        chunk = (logits_NV[i:i + LOGIT_CHUNK_TOKENS], targets_N[i:i + LOGIT_CHUNK_TOKENS])
        if torch.is_grad_enabled() and logits_NV.requires_grad:
            parts.append(checkpoint(_logp_entropy, *chunk, temperature, with_entropy, use_reentrant=False))
        else:
            parts.append(_logp_entropy(*chunk, temperature, with_entropy))
    return torch.cat(parts, dim=0)


def _logp_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, temperature: float,
                  with_entropy: bool) -> torch.Tensor:
    """[N, 2]: log softmax(z)[target] and the entropy of softmax(z), z = logits / T in float32."""
    z = logits_NV.float()
    if temperature != 1.0:
        z = z / temperature
    lse_N = torch.logsumexp(z, dim=-1)
    logp_N = z.gather(-1, targets_N[:, None])[:, 0] - lse_N
    ent_N = lse_N - (z.softmax(-1) * z).sum(-1) if with_entropy else torch.zeros_like(lse_N)
    return torch.stack([logp_N, ent_N], dim=-1)


def pad_columns(t: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    """Right-pad a [B, w] tensor to [B, width]."""
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


@torch.no_grad()
def batched_logprobs(model: torch.nn.Module, batch: Batch, *, micro_batch_size: int,
                     temperature: float = 1.0) -> torch.Tensor:
    """token_logprobs over micro-batches, re-assembled to the batch's full response width."""
    R = batch.response_ids.shape[1]
    parts = [pad_columns(token_logprobs(model, mb, temperature=temperature)[0], R)
             for mb in batch.split(micro_batch_size)]
    return torch.cat(parts, dim=0)


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


Precision = Literal["float32", "bfloat16", "float16"]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of an FSDP2 or plain model, on every rank (collective)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_hf_folder(model: torch.nn.Module, tokenizer, path: str | Path, *, is_main: bool,
                   lora: Any = None) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files) that
    `from_pretrained` loads. Collective: every rank calls it; rank 0 writes.

    With `lora` (the core.lora.LoraConfig the model was wrapped with), the folder holds the
    merged weights (peft's merge_and_unload) and the adapter alone goes to `<path>/../adapter`.
    """
    state = full_state_dict(model)
    if not is_main:
        return
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # A plain module of the same class takes the full weights; save_pretrained handles tied
    # weights and writes safetensors.
    plain = AutoModelForCausalLM.from_config(model.config)
    if lora is not None:
        from core.lora import apply_lora
        wrapped = apply_lora(plain, lora)
        wrapped.load_state_dict(state)
        wrapped.save_pretrained(out.parent / "adapter", safe_serialization=True)
        plain = wrapped.merge_and_unload()
    else:
        plain.load_state_dict(state)
    plain.config.use_cache = True
    plain.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
