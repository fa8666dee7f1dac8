"""Memory hand-off between phases: training state steps aside while the engine generates.

Before GENERATE, the optimizer states (Adam's two moments: twice the parameters in float32)
and, with `hybrid.offload_params`, the sharded parameters themselves move to CPU; the CUDA
caching allocator returns its free blocks (`empty_cache`) so the engine can take them. Before
TRAIN they come back. Every move is timed and logged: offload/<what>_gb, _seconds, _gbps.

On a CPU device there is nothing to free: the hand-off is a no-op and logs nothing. The moving
code itself is device-agnostic and tested on CPU (tests/test_offload.py).

Allocator: `expandable_segments:True` in PYTORCH_CUDA_ALLOC_CONF is incompatible with SGLang's
memory saver (torch_memory_saver); the sglang engine's config calls
`disable_expandable_segments` before CUDA initialises.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> int:
    """Move every tensor of the optimizer state to `device` in place (DTensor states keep their
    sharding: only the local shard moves); returns the bytes moved."""
    moved = 0
    non_blocking = torch.device(device).type == "cpu"
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 and key == "step":
                continue
            local = _local(value)
            if local.device == torch.device(device):
                continue
            moved += local.numel() * local.element_size()
            new_local = local.to(device, non_blocking=non_blocking)
            if isinstance(value, DTensor):
                value._local_tensor = new_local
            else:
                state[key] = new_local
    return moved


def move_params(modules: Iterable[torch.nn.Module], device: torch.device | str) -> int:
    """Move the (sharded) parameters and buffers of modules to `device`; returns bytes moved."""
    moved = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            local = _local(t)
            if local.device != torch.device(device):
                moved += local.numel() * local.element_size()
        module.to(device)
    return moved


class MemoryHandoff:
    """Moves training state off the accelerator for generation and back for training."""

    def __init__(self, *, optimizers: list[torch.optim.Optimizer], modules: list[torch.nn.Module],
                 device: torch.device, offload_optimizer: bool = True, offload_params: bool = False) -> None:
        self.optimizers = optimizers
        self.modules = modules
        self.device = device
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.active = device.type == "cuda" and (offload_optimizer or offload_params)

    def to_generate(self, *, params: bool) -> dict[str, float]:
        """Optimizer states (params=False: before the weight sync) or parameters (params=True:
        after it, since the sync gathers them on the device) to CPU, cache emptied. A no-op
        off CUDA."""
        if not self.active:
            return {}
        out = self._move("cpu", "offload", optimizer=not params, params=params)
        torch.cuda.empty_cache()
        return out

    def to_train(self) -> dict[str, float]:
        """Training state back to the device (a no-op off CUDA)."""
        if not self.active:
            return {}
        return self._move(self.device, "reload", optimizer=True, params=True)

    def _move(self, target: torch.device | str, verb: str, *, optimizer: bool, params: bool
              ) -> dict[str, float]:
        out: dict[str, float] = {}
        parts = []
        if optimizer and self.offload_optimizer:
            parts.append(("optimizer", lambda: sum(move_optimizer_state(o, target) for o in self.optimizers)))
        if params and self.offload_params:
            parts.append(("params", lambda: move_params(self.modules, target)))
        for what, fn in parts:
            t0 = time.perf_counter()
            moved = fn()
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            out[f"offload/{verb}_{what}_gb"] = moved / 1e9
            out[f"offload/{verb}_{what}_seconds"] = seconds
            out[f"offload/{verb}_{what}_gbps"] = moved / max(seconds, 1e-9) / 1e9
        return out


def disable_expandable_segments(reason: str) -> None:
    """Drop expandable_segments:True from PYTORCH_CUDA_ALLOC_CONF (call before CUDA initialises)."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" not in conf:
        return
    kept = ",".join(p for p in conf.split(",") if p.strip() != "expandable_segments:True")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = kept
    logger.warning("PYTORCH_CUDA_ALLOC_CONF: dropped expandable_segments:True (%s); now %r", reason, kept)
