"""The actor: the trained policy, sharded with FSDP2 over every process.

Operations: `log_probs(batch)` (no grad), `update(batch, loss_fn)` (core/optim.py: mini-batches
x epochs of micro-batched forward/backward, gradient clipping, AdamW, LR schedule; the loss
scaling contract is described there), both over micro-batches of `micro_batch_size` samples or
of `max_tokens_per_micro_batch` tokens, padded or packed (`packing`; core/packing.py);
`export_weights()` (full tensors, bucket by bucket, for the rollout engine; LoRA adapters, if
any, folded in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Protocol

import torch

from core.batch import Batch, GlobalCounts
from core.checkpoint import ShardedState
from core.graph import Phase, Result
from core.lora import lora_scalings, merged_buckets
from core.optim import OptimConfig, TrainState
from core.packing import PackedSamples, map_micro_batches, response_logprobs
from core.reshard import full_weight_buckets


class LossFn(Protocol):
    needs_entropy: bool

    def __call__(self, logp_BR: torch.Tensor, entropy_BR: torch.Tensor | None, mb: Batch,
                 counts: GlobalCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class Actor:
    phase: ClassVar[Phase] = Phase.TRAIN

    @dataclass(kw_only=True, slots=True)
    class Config(OptimConfig):
        pass

    def __init__(self, cfg: Config, model: torch.nn.Module, *, total_steps: int,
                 temperature: float = 1.0, share_prompts: bool = True) -> None:
        """share_prompts: run each distinct prompt of a micro-batch once (a GRPO group's n samples
        share one) and the responses on its KV cache, where that runs fewer tokens than the
        other layout (core.models.shared_prompt_logits: the same log-probs and gradients up to
        float rounding; off under activation checkpointing and for models with other than
        full-attention layers). Not a config key: it changes no number; False for tests."""
        self.cfg = cfg
        self.model = model
        self.temperature = temperature
        self.train_state = TrainState(model, cfg, total_steps=total_steps, share_prompts=share_prompts)
        self.lora_scalings = lora_scalings(model)
        """LoRA adapters (peft) to fold into the exported weights; empty for a plain model."""

    @property
    def version(self) -> int:
        """Optimizer steps taken; the hybrid engine re-syncs the rollout when it changes."""
        return self.train_state.version

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_state.optimizer

    @torch.no_grad()
    def log_probs(self, batch: Batch) -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the current policy."""
        self.model.eval()

        def logp(mb: Batch, packed: PackedSamples | None) -> torch.Tensor:
            return response_logprobs(self.model, mb, packed, temperature=self.temperature)[0]
        return map_micro_batches(batch, self.cfg, logp, one_row=self.train_state.one_row,
                                 share_prompts=self.train_state.share_prompts)

    def _micro_loss(self, loss_fn: LossFn):
        def micro(mb: Batch, counts: GlobalCounts, packed: PackedSamples | None):
            logp_BR, ent_BR = response_logprobs(self.model, mb, packed, temperature=self.temperature,
                                                with_entropy=loss_fn.needs_entropy)
            return loss_fn(logp_BR, ent_BR, mb, counts)
        return micro

    def update(self, batch: Batch, *, loss_fn: LossFn) -> Result:
        metrics = self.train_state.update(batch, self._micro_loss(loss_fn))
        return Result(metrics={f"actor/{k}": v for k, v in metrics.items()})

    def accumulate(self, batch: Batch, loss_fn: LossFn) -> dict[str, float]:
        """Gradients of one optimizer step without stepping (for tests and diagnostics)."""
        self.model.train()
        return self.train_state.accumulate(batch, self._micro_loss(loss_fn))

    def state_dict(self) -> dict[str, Any]:
        return self.train_state.local_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_state.load_local_state(state)

    def sharded_state(self) -> ShardedState:
        return self.train_state.sharded_state()

    def export_weights(self, *, bucket_bytes: int, dtype: torch.dtype | None = None
                       ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full weights in buckets of about bucket_bytes (a collective: call on every rank)."""
        buckets = full_weight_buckets(self.model, bucket_bytes=bucket_bytes, dtype=dtype)
        return merged_buckets(buckets, self.lora_scalings) if self.lora_scalings else buckets
