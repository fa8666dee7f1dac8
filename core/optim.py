"""A trainable sharded model: its optimizer, LR schedule and the update loop.

The actor and the critic share this. One `update` runs `epochs` passes over the step's
samples, split into `mini_batches` optimizer steps, each accumulated over micro-batches.

Loss scaling contract. A micro-batch loss function sees one micro-batch and the `GlobalCounts`
of its whole optimizer step (tokens and sequences summed over every micro-batch on every rank).
It returns its micro-batch's *share* of the step loss (e.g. sum(mask * L) / counts.tokens for
token-mean), so shares add up to the exact global value however the step is split. FSDP2
averages gradients over ranks, so each share is multiplied by the world size before backward;
the sum over ranks is then the true gradient. Metrics returned alongside are shares too.

Micro-batches (core/packing.py, core/microbatch.py's plan): `micro_batch_size` samples each, or with
`max_tokens_per_micro_batch` as many as fit a token budget, balanced across ranks; every rank
runs the same number (an FSDP2 forward is a collective), a rank with fewer samples running idle
micro-batches that contribute nothing. With `packing`, each micro-batch runs on packed rows
(no padding); the loss function still sees the padded [B, R] layout.

No host synchronisation inside the loop: the plan is made from sample sizes read off the device
once per update (one transfer, one all-gather), the counts come from those sizes, and losses and
metrics are summed on the device; they reach the host once, when the update ends (one
all-reduce). The update guard in `step` reads the gradient norm each optimizer step.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch.distributed.tensor import DTensor

from core import dist
from core.batch import Batch, GlobalCounts
from core.checkpoint import ShardedState
from core.config import RangeError, above, at_least, between
from core.microbatch import SampleSizes, sample_sizes, step_counts
from core.models import enable_activation_checkpointing, full_attention_only, varlen_attention
from core.packing import MicroBatch, PackedSamples, micro_batches

logger = logging.getLogger(__name__)

MicroLoss = Callable[[Batch, GlobalCounts, "PackedSamples | None"], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(micro-batch in the padded layout, the step's counts, the same samples packed or None) ->
(this micro-batch's share of the step loss, metrics as shares)."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from ~0 to lr."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Shape after warm-up, decaying to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    micro_batch_size: int = 8
    """Samples per forward/backward on each rank (unless max_tokens_per_micro_batch is set)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of one forward/backward (prompt + response tokens; padded: the padded
    rectangle): micro-batches are filled up to it and balanced across ranks (core/microbatch.py's
    plan_micro_batches); a sample over it goes alone. None: micro_batch_size samples each."""
    packing: bool = True
    """Run each micro-batch on packed rows (real tokens only, position ids restarting per sample)
    instead of the padded [B, P + R] layout; the same numbers, less compute on padding
    (docs/benchmarks.md: 2.0x the actor update on the long quickstart, even on the quickstart's
    6-token responses). false: the padded layout (needed for batches whose masks have holes)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, more compute)."""
    mini_batches: int = 1
    """Optimizer steps per training step: the step's samples split into this many parts."""
    epochs: int = 1
    """Passes over the step's samples (PPO epochs)."""
    param_dtype: str = "float32"
    """FSDP2 compute dtype (bfloat16 on GPU); master weights stay float32."""
    max_bad_steps: int = 5
    """Stop the run after this many optimizer steps in a row were skipped (a non-finite loss or
    gradient, or an update the guard refused)."""
    max_update_ratio: float | None = 1.0
    """Update guard: before each optimizer step, the update AdamW would apply is computed
    (one extra pass over the parameters); the step is skipped and counted if it would make a
    parameter non-finite or move the parameters by more than this fraction of their norm
    (global L2; ordinary steps move them by 1e-5 to 1e-2). None: no guard."""

    def __post_init__(self) -> None:
        above(self, 0, "lr")
        at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        at_least(self, 1, "micro_batch_size", "mini_batches", "epochs", "max_bad_steps",
                 "max_tokens_per_micro_batch")
        above(self, 0, "max_update_ratio")
        between(self, 0, 1, "min_lr_ratio")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RangeError("betas", "two values in [0, 1)", self.betas)
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise RangeError("param_dtype", "one of float32, bfloat16, float16", self.param_dtype)


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were skipped as non-finite or refused by the guard."""


class TrainState:
    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, *, total_steps: int,
                 share_prompts: bool = False) -> None:
        self.model = model
        self.cfg = cfg
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.one_row = varlen_attention(model)
        """Pack each micro-batch into one row (a variable-length attention kernel)."""
        self.share_prompts = share_prompts and not cfg.activation_checkpointing and full_attention_only(model)
        """The micro-batch loss runs each distinct prompt once where that is cheaper than packing
        (core.packing.micro_batches); not under activation checkpointing, which drops the KV cache
        that layout runs on, nor for models with other than full-attention layers."""
        # Only trainable parameters get optimizer state (frozen LoRA base weights do not).
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps * cfg.mini_batches * cfg.epochs))
        self.version = 0
        """Optimizer steps taken."""
        self.skipped_steps = 0
        self.bad_in_a_row = 0

    def sharded_state(self) -> ShardedState:
        return ShardedState(self.model, self.optimizer)

    def local_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "version": self.version,
                "skipped_steps": self.skipped_steps}

    def load_local_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.version, self.skipped_steps = state["version"], state["skipped_steps"]

    def update(self, batch: Batch, micro_loss: MicroLoss) -> dict[str, float]:
        """All optimizer steps of one training step; metrics averaged over them."""
        self.model.train()
        sizes = sample_sizes(batch)
        everyone = dist.all_gather_objects(sizes)
        steps = [self._plan(mini, [s.select(rows) for s, rows in zip(everyone, parts)])
                 for mini, parts in zip(split_even(batch, self.cfg.mini_batches),
                                        zip(*(even_rows(len(s), self.cfg.mini_batches) for s in everyone)))]
        shares: dict[str, torch.Tensor] = {}
        sums: dict[str, float] = defaultdict(float)
        n_opt = 0
        for _ in range(self.cfg.epochs):
            for mbs, counts in steps:
                for key, value in self._accumulate(mbs, counts, micro_loss).items():
                    shares[key] = shares[key] + value if key in shares else value
                for key, f in self.step().items():
                    sums[key] += f
                n_opt += 1
        for key, f in reduce_shares(shares).items():
            sums[key] += f
        out = {k: v / n_opt for k, v in sums.items()}
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        out["skipped_steps"] = float(self.skipped_steps)
        return out

    def accumulate(self, mini: Batch, micro_loss: MicroLoss) -> dict[str, float]:
        """Forward/backward over the micro-batches of one optimizer step (gradients accumulate
        in .grad); returns the step's loss and metrics summed over micro-batches and ranks."""
        sizes = sample_sizes(mini)
        return reduce_shares(self._accumulate(*self._plan(mini, dist.all_gather_objects(sizes)), micro_loss))

    def _plan(self, mini: Batch, sizes_by_rank: Sequence[SampleSizes]
              ) -> tuple[list[MicroBatch], GlobalCounts]:
        """One optimizer step's micro-batches and counts, from every rank's sizes (no collective)."""
        mine = sizes_by_rank[dist.info().rank]
        return (micro_batches(mini, self.cfg, one_row=self.one_row, share_prompts=self.share_prompts, sizes=mine,
                              sizes_by_rank=sizes_by_rank),
                step_counts(sizes_by_rank))

    def _accumulate(self, mbs: list[MicroBatch], counts: GlobalCounts, micro_loss: MicroLoss
                    ) -> dict[str, torch.Tensor]:
        """The loop: forward/backward per micro-batch; loss and metric shares summed on the device."""
        world = dist.info().world_size
        shares: dict[str, torch.Tensor] = {}

        def add(key: str, value: torch.Tensor, device: torch.device) -> None:
            v = value.detach().to(device=device, dtype=torch.float64)
            shares[key] = shares[key] + v if key in shares else v

        for mb in mbs:
            loss, metrics = micro_loss(mb.batch, counts, mb.packed)
            (loss * (0.0 if mb.idle else world)).backward()
            if mb.idle:
                continue
            add("loss", loss, loss.device)
            for k, v in metrics.items():
                add(k, torch.as_tensor(v), loss.device)
        return shares

    def step(self) -> dict[str, float]:
        """Clip, then step and advance the schedule, unless the gradient norm is not finite or
        the update guard refuses the update; returns grad_norm (and update_ratio with the guard)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm_t = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm_t, DTensor):
            norm_t = norm_t.full_tensor()
        norm = float(norm_t)
        out = {"grad_norm": norm if math.isfinite(norm) else float("nan")}
        # A NaN/inf loss makes the norm non-finite too. Every rank sees the same global norm
        # (and the same guard verdict), so every rank skips together.
        refused = None if math.isfinite(norm) else f"non-finite gradient norm ({norm})"
        if refused is None and self.cfg.max_update_ratio is not None:
            ratio, nonfinite = adamw_update_ratio(self.optimizer)
            out["update_ratio"] = ratio
            if nonfinite:
                refused = f"the update would make {nonfinite:.0f} parameter values non-finite"
            elif not ratio <= self.cfg.max_update_ratio:
                refused = (f"the update would move the parameters by {ratio:.3g} x their norm "
                           f"(max_update_ratio={self.cfg.max_update_ratio})")
        if refused is None:
            self.optimizer.step()
            self.scheduler.step()  # a skipped step does not advance the schedule (as Megatron)
            self.version += 1
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            logger.warning("%s: update skipped (%d in a row)", refused, self.bad_in_a_row)
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise NonFiniteError(f"{self.bad_in_a_row} optimizer steps in a row were skipped, the last "
                                     f"because {refused}; stopping (max_bad_steps={self.cfg.max_bad_steps})")
        self.optimizer.zero_grad(set_to_none=True)
        return out


GUARD_CHUNK = 1 << 22
"""Elements per piece of the update guard's pass (bounds its temporary memory to a few times
16 MB, whatever the size of the largest parameter)."""


@torch.no_grad()
def adamw_update_ratio(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(||update|| / ||params||, number of parameter values the update would make non-finite)
    for the step `optimizer` (AdamW, decoupled weight decay, no amsgrad) is about to take, over
    every rank's shards (collective). Computed from each parameter's gradient and state as AdamW
    does, in float32 pieces, changing nothing."""
    delta_sq = param_sq = nonfinite = 0.0
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("the update guard supports AdamW without amsgrad or maximize")
        (beta1, beta2), lr, eps, wd = group["betas"], float(group["lr"]), group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            t = float(state["step"]) + 1 if "step" in state else 1.0
            step_size, bc2_sqrt = lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)
            flat = [_local(x).reshape(-1) for x in (p, p.grad, *((state["exp_avg"], state["exp_avg_sq"])
                                                                  if state else ()))]
            for i in range(0, flat[0].numel(), GUARD_CHUNK):
                w, g, *mv = (x[i:i + GUARD_CHUNK].float() for x in flat)
                m = beta1 * mv[0] + (1 - beta1) * g if mv else (1 - beta1) * g
                v = beta2 * mv[1] + (1 - beta2) * g * g if mv else (1 - beta2) * g * g
                new = w * (1 - lr * wd) - step_size * m / (v.sqrt() / bc2_sqrt + eps)
                nonfinite += float((~torch.isfinite(new)).sum())
                delta_sq += float(torch.nan_to_num(new - w, posinf=0.0, neginf=0.0).double().square().sum())
                param_sq += float(w.double().square().sum())
    sums = dist.all_reduce_scalars({"delta": delta_sq, "param": param_sq, "nonfinite": nonfinite})
    ratio = math.sqrt(sums["delta"]) / max(math.sqrt(sums["param"]), 1e-12)
    return ratio, sums["nonfinite"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def even_rows(n: int, parts: int) -> list[range]:
    """The rows of each of `parts` equal mini-batches of n samples."""
    if n % parts or n == 0:
        raise ValueError(f"mini_batches={parts} does not divide the {n} samples of this rank's step")
    size = n // parts
    return [range(i, i + size) for i in range(0, n, size)]


def split_even(batch: Batch, parts: int) -> list[Batch]:
    return [batch.select(rows) for rows in even_rows(len(batch), parts)]


def reduce_shares(shares: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device-side sums, summed over ranks and brought to the host: one all-reduce, one transfer
    (keys must match on every rank)."""
    if not shares:
        return {}
    keys = sorted(shares)
    total = dist.all_reduce(torch.stack([shares[k] for k in keys]))
    return dict(zip(keys, total.tolist()))


def lr_lambda(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step s: linear warm-up, then the configured decay."""
    warm, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant" or total <= warm:
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
        return floor + (1 - floor) * decay
    return f
