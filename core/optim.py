"""A trainable sharded model: its optimizer, LR schedule and the update loop.

The actor and the critic share this. One `update` runs `epochs` passes over the step's
samples, split into `mini_batches` optimizer steps, each accumulated over micro-batches.

Loss scaling contract. A micro-batch loss function sees one micro-batch and the `GlobalCounts`
of its whole optimizer step (tokens and sequences summed over every micro-batch on every rank).
It returns its micro-batch's *share* of the step loss (e.g. sum(mask * L) / counts.tokens for
token-mean), so shares add up to the exact global value however the step is split. FSDP2
averages gradients over ranks, so each share is multiplied by the world size before backward;
the sum over ranks is then the true gradient. Metrics returned alongside are shares too.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch.distributed.tensor import DTensor

from core import dist
from core.batch import Batch, GlobalCounts, global_counts
from core.checkpoint import ShardedState
from core.config import RangeError, above, at_least, between

logger = logging.getLogger(__name__)

MicroLoss = Callable[[Batch, GlobalCounts], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
    """Samples per forward/backward on each rank."""
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
        at_least(self, 1, "micro_batch_size", "mini_batches", "epochs", "max_bad_steps")
        above(self, 0, "max_update_ratio")
        between(self, 0, 1, "min_lr_ratio")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RangeError("betas", "two values in [0, 1)", self.betas)
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise RangeError("param_dtype", "one of float32, bfloat16, float16", self.param_dtype)


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were skipped as non-finite or refused by the guard."""


class TrainState:
    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, *, total_steps: int) -> None:
        self.model = model
        self.cfg = cfg
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
        sums: dict[str, float] = defaultdict(float)
        n_opt = 0
        for _ in range(self.cfg.epochs):
            for mini in split_even(batch, self.cfg.mini_batches):
                for key, value in self.accumulate(mini, micro_loss).items():
                    sums[key] += value
                for key, value in self.step().items():
                    sums[key] += value
                n_opt += 1
        out = {k: v / n_opt for k, v in sums.items()}
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        out["skipped_steps"] = float(self.skipped_steps)
        return out

    def accumulate(self, mini: Batch, micro_loss: MicroLoss) -> dict[str, float]:
        """Forward/backward over the micro-batches of one optimizer step (gradients accumulate
        in .grad); returns the step's loss and metrics summed over micro-batches and ranks."""
        counts = global_counts(mini)
        world = dist.info().world_size
        shares: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        for mb in mini.split(self.cfg.micro_batch_size):
            loss, metrics = micro_loss(mb, counts)
            (loss * world).backward()
            shares["loss"] += loss.detach().double().cpu()
            for k, v in metrics.items():
                shares[k] += v.detach().double().cpu()
        return dist.all_reduce_scalars({k: float(v) for k, v in shares.items()})

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


def split_even(batch: Batch, parts: int) -> list[Batch]:
    if len(batch) % parts:
        raise ValueError(f"mini_batches={parts} does not divide the {len(batch)} samples of this "
                         f"rank's step")
    size = len(batch) // parts
    return [batch.select(range(i, i + size)) for i in range(0, len(batch), size)]


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
