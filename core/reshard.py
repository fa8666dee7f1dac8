"""Weight reshard: from the FSDP2 training layout to the layout a rollout engine takes.

Each FSDP2 parameter is a DTensor sharded on dim 0 over the data-parallel mesh. An engine that
slices weights itself (the `torch` engine; SGLang's `update_weights_from_tensor`) wants full
tensors, so every rank gathers each parameter (`DTensor.full_tensor()`, an all-gather), casts it
to the engine dtype, and hands buckets of about `bucket_bytes` to the engine. A bucket is freed
once the engine has copied it, so peak extra memory is about one bucket, not one model.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.distributed.tensor import DTensor


def full_weight_buckets(model: torch.nn.Module, *, bucket_bytes: int,
                        dtype: torch.dtype | None = None
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (name, full tensor) of about bucket_bytes each, in parameter order.

    A collective: every rank must consume the iterator to the end, in step.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        t = param.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


# --- Tensor-parallel layout -------------------------------------------------------------------
#
# An engine that takes pre-sliced weights (rather than slicing full tensors itself) needs, on
# tensor-parallel rank r of T, the Megatron layout of a Qwen2/Llama-style decoder:
#
#   column-parallel (dim 0 split): q/k/v_proj (weight and bias), gate_proj, up_proj
#   row-parallel    (dim 1 split): o_proj, down_proj (their biases, if any, stay whole)
#   vocab-parallel  (dim 0 split, padded): embed_tokens, lm_head: ceil(V / T) rows per rank,
#                                  the last rank's tail zero-padded
#   replicated:                    norms and anything 1-D not listed above
#
# k/v projections with fewer KV heads than ranks (T % kv_heads == 0) are replicated by head:
# rank r holds KV head r // (T / kv_heads), as in SGLang and vLLM.

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
VOCAB = ("embed_tokens", "lm_head")


def tp_kind(name: str, ndim: int) -> str:
    """"column", "row", "vocab" or "replicated" for a parameter of a Qwen2/Llama-style model."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    leaf = name.rsplit(".", 1)[-1]
    if module in VOCAB:
        return "vocab"
    if module in COLUMN:
        return "column"
    if module in ROW:
        return "row" if leaf == "weight" else "replicated"
    if ndim >= 2:
        raise ValueError(f"no tensor-parallel layout is known for the {ndim}-D parameter {name!r} "
                         f"(known: {', '.join(COLUMN + ROW + VOCAB)}; 1-D norms are replicated)")
    return "replicated"


def tp_slice(name: str, full: torch.Tensor, *, tp_rank: int, tp_size: int, num_heads: int,
             num_kv_heads: int) -> torch.Tensor:
    """The part of the full parameter `name` that tensor-parallel rank `tp_rank` holds (a view
    where possible; vocab slices of the last rank are padded copies)."""
    if tp_size == 1:
        return full
    kind = tp_kind(name, full.dim())
    if kind == "replicated":
        return full
    if kind == "row":
        return _even_chunk(full, 1, tp_rank, tp_size, name)
    if kind == "vocab":
        rows = -(-full.shape[0] // tp_size)
        part = full[tp_rank * rows:(tp_rank + 1) * rows]
        if part.shape[0] < rows:
            pad = full.new_zeros((rows - part.shape[0], *full.shape[1:]))
            part = torch.cat([part, pad])
        return part
    module = name.rsplit(".", 2)[-2]
    if module in ("k_proj", "v_proj") and num_kv_heads < tp_size:
        if tp_size % num_kv_heads:
            raise ValueError(f"tp_size={tp_size} must divide or be a multiple of num_key_value_heads="
                             f"{num_kv_heads}")
        head_dim = full.shape[0] // num_kv_heads
        head = tp_rank // (tp_size // num_kv_heads)
        return full[head * head_dim:(head + 1) * head_dim]
    heads = num_kv_heads if module in ("k_proj", "v_proj") else num_heads
    if module in ("q_proj", "k_proj", "v_proj") and heads % tp_size:
        raise ValueError(f"{name}: {heads} heads cannot be split over tp_size={tp_size}")
    return _even_chunk(full, 0, tp_rank, tp_size, name)


def _even_chunk(t: torch.Tensor, dim: int, rank: int, size: int, name: str) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} does not split over tp_size={size}")
    step = t.shape[dim] // size
    return t.narrow(dim, rank * step, step)


def tp_weight_buckets(model: torch.nn.Module, *, tp_rank: int, tp_size: int, num_heads: int,
                      num_kv_heads: int, bucket_bytes: int, dtype: torch.dtype | None = None
                      ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Like full_weight_buckets, but each tensor is this rank's tensor-parallel slice (a
    contiguous copy; the gathered full parameter is dropped at once, so peak extra memory is one
    bucket of slices plus one full parameter). A collective over the FSDP mesh."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        full = param.detach()
        if isinstance(full, DTensor):
            full = full.full_tensor()
        part = tp_slice(name, full, tp_rank=tp_rank, tp_size=tp_size, num_heads=num_heads,
                        num_kv_heads=num_kv_heads)
        # an independent contiguous copy, so the gathered full parameter can be freed now
        part = part.to(dtype or part.dtype).clone(memory_format=torch.contiguous_format)
        del full
        bucket.append((name, part))
        size += part.numel() * part.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
