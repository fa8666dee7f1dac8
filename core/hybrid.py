"""The hybrid engine: training and generation take turns on one device.

TRAIN -> GENERATE: on CUDA the optimizer states go to CPU (core/offload.py); if the actor
stepped since the last sync (or the engine dropped its weights while asleep), its weights stream
from the FSDP2 shards into the rollout engine bucket by bucket (core/reshard.py); then, if so
configured, the parameters go to CPU too; last the engine wakes (its KV cache comes back).
GENERATE -> TRAIN: the engine sleeps (SGLang releases its memory) and training state comes back.
Every switch is timed; every sync reports bytes, seconds and GB/s, under `reshard/*`, and peak
device memory of each phase under `memory/*` (CUDA only).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

from core.config import above
from core.graph import Phase
from core.offload import MemoryHandoff

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class HybridConfig:
    bucket_mb: float = 64.0
    """Size of one weight bucket streamed into the engine during a sync."""
    offload_optimizer: bool = True
    """On CUDA: optimizer states go to CPU during generation (core/offload.py)."""
    offload_params: bool = False
    """On CUDA: the sharded parameters go to CPU during generation too."""

    def __post_init__(self) -> None:
        above(self, 0, "bucket_mb")


class WeightSource(Protocol):
    """The trained policy (roles.actor.Actor): its version and its full weights in buckets."""

    @property
    def version(self) -> int: ...

    def export_weights(self, *, bucket_bytes: int, dtype: torch.dtype | None = None
                       ) -> Iterator[list[tuple[str, torch.Tensor]]]: ...


class WeightSink(Protocol):
    """The generating side (roles.rollout.Rollout): takes weights, sleeps and wakes."""

    @property
    def needs_full_sync(self) -> bool: ...

    def begin_weight_update(self) -> None: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int: ...

    def end_weight_update(self, version: int) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


class HybridEngine:
    def __init__(self, cfg: HybridConfig, *, actor: WeightSource, rollout: WeightSink,
                 engine_dtype: torch.dtype, device: torch.device,
                 handoff: MemoryHandoff | None = None) -> None:
        self.cfg = cfg
        self.actor = actor
        self.rollout = rollout
        self.engine_dtype = engine_dtype
        self.device = device
        self.handoff = handoff
        """core.offload.MemoryHandoff: training state off the device while generating."""
        self.phase = Phase.TRAIN
        self.synced_version: int | None = None
        self.last_sync: dict[str, float] = {}

    def enter(self, phase: Phase) -> dict[str, float]:
        """Switch to `phase` if not already there; returns the switch's metrics."""
        if phase is self.phase or phase is Phase.ANY:
            return {}
        t0 = time.perf_counter()
        metrics = self._memory_metrics(self.phase)
        if phase is Phase.GENERATE:
            if self.handoff is not None:  # optimizer states leave first ...
                metrics.update(self.handoff.to_generate(params=False))
            metrics.update(self.sync_weights(force=self.rollout.needs_full_sync))
            if self.handoff is not None:  # ... parameters only after the sync has gathered them
                metrics.update(self.handoff.to_generate(params=True))
            self.rollout.wake()
        else:
            self.rollout.sleep()
            if self.handoff is not None:
                metrics.update(self.handoff.to_train())
        self.phase = phase
        metrics[f"timing_s/switch_to_{phase.value}"] = time.perf_counter() - t0
        return metrics

    def sync_weights(self, *, force: bool = False) -> dict[str, float]:
        """Stream the actor's weights into the engine if they changed (collective)."""
        if not force and self.synced_version == self.actor.version:
            return {}
        t0 = time.perf_counter()
        received, buckets = 0, 0
        self.rollout.begin_weight_update()
        for bucket in self.actor.export_weights(bucket_bytes=int(self.cfg.bucket_mb * 2**20),
                                                dtype=self.engine_dtype):
            received += self.rollout.load_weights(bucket)
            buckets += 1
            del bucket  # free the gathered copies before the next all-gather
        self.rollout.end_weight_update(self.actor.version)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the buckets' blocks go back before the engine's KV cache
        seconds = time.perf_counter() - t0
        self.synced_version = self.actor.version
        self.last_sync = {"reshard/bytes": float(received), "reshard/seconds": seconds,
                          "reshard/gbps": received / max(seconds, 1e-9) / 1e9,
                          "reshard/buckets": float(buckets)}
        logger.debug("weight sync: %.1f MB in %.3f s (%.2f GB/s, %d buckets)",
                     received / 1e6, seconds, self.last_sync["reshard/gbps"], buckets)
        return dict(self.last_sync)

    def _memory_metrics(self, leaving: Phase) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        out = {f"memory/{leaving.value}_peak_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
               f"memory/{leaving.value}_peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 1e9}
        torch.cuda.reset_peak_memory_stats(self.device)
        return out

