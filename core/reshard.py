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
