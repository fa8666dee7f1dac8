"""Weight reshard: from the FSDP2 training layout to the layout a rollout engine takes.

Each FSDP2 parameter is a DTensor sharded on dim 0 over the data-parallel mesh. An engine that
slices weights itself (the `torch` engine; SGLang's `update_weights_from_tensor`) wants full
tensors, so every rank gathers the parameters of a bucket (cast to the engine dtype first, then
one all-gather for the whole bucket) and hands buckets of about `bucket_bytes` to the engine. A
bucket is freed once the engine has copied it, so peak extra memory is about one bucket, not one
model. (A slicer to tensor-parallel layouts lived here until nothing called it: docs/gpu.md.)
"""
from __future__ import annotations

import math
from typing import Iterator, TypeGuard

import torch
from torch.distributed.tensor import DTensor, Shard

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name now warns);
# older releases (2.11, 2.12) have only the old name.
_all_gather_single = (torch.distributed.all_gather_single if hasattr(torch.distributed, "all_gather_single")
                      else torch.distributed.all_gather_into_tensor)


def full_weight_buckets(model: torch.nn.Module, *, bucket_bytes: int,
                        dtype: torch.dtype | None = None, batched: bool = True
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (name, full tensor) of about bucket_bytes each, in parameter order.

    With `batched`, a bucket's FSDP2 shards (dim-0 DTensors on one 1-D mesh) are cast to the
    engine dtype first and gathered in one all-gather per bucket, instead of one all-gather per
    parameter (measured side by side in docs/benchmarks.md); other parameters are gathered
    one by one. A collective: every rank must consume the iterator to the end, in step.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        pending.append((name, param.detach()))
        size += param.numel() * (dtype.itemsize if dtype is not None else param.element_size())
        if size >= bucket_bytes:
            yield _gather_bucket(pending, dtype, batched)
            pending, size = [], 0
    if pending:
        yield _gather_bucket(pending, dtype, batched)


def _gather_bucket(params: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                   batched: bool) -> list[tuple[str, torch.Tensor]]:
    out: dict[str, torch.Tensor] = {}
    together: list[tuple[str, DTensor]] = [(n, p) for n, p in params if batched and _dim0_sharded(p)]
    if together and len({p.device_mesh for _, p in together}) == 1 and \
            len({dtype or p.dtype for _, p in together}) == 1:
        out.update(_all_gather_dim0(together, dtype or together[0][1].dtype))
    for name, p in params:
        if name not in out:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.to(dtype) if dtype is not None and t.dtype != dtype else t
    return [(name, out[name]) for name, _ in params]


def _dim0_sharded(p: torch.Tensor) -> TypeGuard[DTensor]:
    return (isinstance(p, DTensor) and p.device_mesh.ndim == 1 and len(p.placements) == 1
            and isinstance(p.placements[0], Shard) and p.placements[0].dim == 0)


def _rows(dim0: int, world: int) -> list[int]:
    """Rows of each rank under torch.chunk (FSDP2's dim-0 sharding; trailing ranks may get 0)."""
    c = -(-dim0 // world)
    return [max(0, min(c, dim0 - r * c)) for r in range(world)]


def _all_gather_dim0(params: list[tuple[str, DTensor]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full tensors of dim-0 sharded DTensors through one all_gather_into_tensor: each rank
    packs its shards (cast to dtype) into one flat buffer padded to the largest rank's size."""
    mesh = params[0][1].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = [0] * world  # elements each rank contributes
    layout = []  # (name, full shape, row numel, rows per rank)
    for name, p in params:
        rows = _rows(p.shape[0], world)
        row_numel = math.prod(p.shape[1:])  # (indexing the DTensor would all-gather it)
        if tuple(p.to_local().shape[:1]) != (rows[rank],):
            raise AssertionError(f"{name}: local shard {tuple(p.to_local().shape)} is not torch.chunk's")
        layout.append((name, p.shape, row_numel, rows))
        for r in range(world):
            per_rank[r] += rows[r] * row_numel
    width = max(per_rank)
    device = params[0][1].to_local().device
    send = torch.zeros(width, dtype=dtype, device=device)
    offset = 0
    for _, p in params:
        local = p.to_local().reshape(-1)
        send[offset:offset + local.numel()].copy_(local)  # copy_ casts to dtype
        offset += local.numel()
    recv = torch.empty(world * width, dtype=dtype, device=device)
    _all_gather_single(recv, send, group=mesh.get_group())
    out, offsets = {}, [r * width for r in range(world)]
    for name, shape, row_numel, rows in layout:
        parts = []
        for r in range(world):
            n = rows[r] * row_numel
            parts.append(recv[offsets[r]:offsets[r] + n])
            offsets[r] += n
        out[name] = torch.cat(parts).reshape(shape)
    del recv
    return out
