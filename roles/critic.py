"""The critic: an LM backbone with a scalar value head, sharded with FSDP2, its own optimizer.

`values(batch)` gives V(s_t) for every response token t: the head's output at the position
before t (the state from which t is generated), the same positions whose logits the actor
uses. `update(batch, loss)` fits them to `returns` with the clipped value loss (core/optim.py
runs the loop and defines the loss scaling contract).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from core import dist
from core.batch import Batch, GlobalCounts, loss_mask, model_inputs
from core.checkpoint import ShardedState
from core.graph import Phase, Result
from core.optim import OptimConfig, TrainState
from core.packing import PackedSamples, map_micro_batches, sampled_only


class ValueLossFn(Protocol):
    """The critic's objective (algorithms.losses.ValueLoss): this micro-batch's share of the
    step's value loss, and metrics, from the predicted values [B, R]."""

    def __call__(self, values_BR: torch.Tensor, mb: Batch, counts: GlobalCounts
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class ValueModel(nn.Module):
    """A causal LM's backbone (its LM head dropped) and a linear head to one scalar per token."""

    def __init__(self, causal_lm: PreTrainedModel, *, head_init_std: float, seed: int) -> None:
        super().__init__()
        self.backbone: Any = causal_lm.base_model  # an HF decoder (returns last_hidden_state)
        self.config = causal_lm.config
        self.head = nn.Linear(causal_lm.config.hidden_size, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] float32 values; attention_mask None for packed rows (position ids restart)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def response_values(model: ValueModel, batch: Batch, packed: PackedSamples | None = None) -> torch.Tensor:
    """[B, R]: V(s_t) for each response token t, 0 at masked positions; computed on the packed
    rows of `batch`'s samples when `packed` is given (the same values)."""
    if packed is not None:
        v_BL = model(packed.ids_BL, None, packed.pos_BL)
        return sampled_only(batch, packed.to_samples(v_BL.reshape(-1)[packed.slot_N]))
    ids, mask, pos = model_inputs(batch)
    P = batch.prompt_ids.shape[1]
    v_BT = model(ids, mask, pos)
    values_BR = v_BT[:, P - 1:-1]
    return torch.where(batch.response_mask.bool(), values_BR, torch.zeros_like(values_BR))


class Critic:
    phase: ClassVar[Phase] = Phase.TRAIN

    @dataclass(kw_only=True, slots=True)
    class Config(OptimConfig):
        lr: float = 5e-6
        model_path: str | None = None
        """Local folder for the critic's backbone; None: the policy's model."""
        head_init_std: float = 0.0
        """Std of the value head's initial weights (0: the critic starts at V = 0)."""

    def __init__(self, cfg: Config, model: ValueModel, *, total_steps: int) -> None:
        self.cfg = cfg
        self.model = model
        self.train_state = TrainState(model, cfg, total_steps=total_steps)

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return map_micro_batches(batch, self.cfg, lambda mb, packed: response_values(self.model, mb, packed),
                                 one_row=self.train_state.one_row)

    def state_dict(self) -> dict[str, Any]:
        return self.train_state.local_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_state.load_local_state(state)

    def sharded_state(self) -> ShardedState:
        return self.train_state.sharded_state()

    def _micro_loss(self, loss: ValueLossFn):
        def micro(mb: Batch, counts: GlobalCounts, packed: PackedSamples | None):
            return loss(response_values(self.model, mb, packed), mb, counts)
        return micro

    def update(self, batch: Batch, *, loss: ValueLossFn) -> Result:
        ev = explained_variance(batch.returns, batch.values, loss_mask(batch))
        metrics = self.train_state.update(batch, self._micro_loss(loss))
        out = {f"critic/{k}": v for k, v in metrics.items()}
        out["critic/explained_variance"] = ev
        return Result(metrics=out)

    def accumulate(self, batch: Batch, loss: ValueLossFn) -> dict[str, float]:
        """Gradients of one optimizer step without stepping (for tests and diagnostics)."""
        self.model.train()
        return self.train_state.accumulate(batch, self._micro_loss(loss))


def explained_variance(returns_BR: torch.Tensor, values_BR: torch.Tensor, mask_BR: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens of all ranks (collective)."""
    m = mask_BR.bool()
    r, d = returns_BR[m].double(), (returns_BR - values_BR)[m].double()
    s = dist.all_reduce_scalars({"n": float(m.sum()), "r": float(r.sum()), "r2": float(r.square().sum()),
                                 "d": float(d.sum()), "d2": float(d.square().sum())})
    n = max(s["n"], 1.0)
    var_r = s["r2"] / n - (s["r"] / n) ** 2
    var_d = s["d2"] / n - (s["d"] / n) ** 2
    return 1.0 - var_d / var_r if var_r > 1e-12 else 0.0
