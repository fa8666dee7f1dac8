"""The reference policy: an FSDP2 copy of the initial actor, for KL terms, or a teacher.

By default it stays fixed. As T1's *dynamic anchor* it can follow the actor: reset to it every
`anchor_every` steps, or move toward it as an exponential moving average after every step.
Both copy local shards (actor and reference are sharded alike), so no communication is needed.

With `model_path` it serves a frozen teacher instead (on-policy distillation, algorithm `opd`):
another model folder with the policy's tokenizer, built in the initial actor's place
(`Config.source`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from core.batch import Batch
from core.checkpoint import ShardedState
from core.config import at_least, between
from core.graph import Phase
from core.models import ModelConfig, full_attention_only, varlen_attention
from core.packing import PackedSamples, map_micro_batches, response_logprobs


class Reference:
    phase: ClassVar[Phase] = Phase.TRAIN

    @dataclass(kw_only=True, slots=True)
    class Config:
        micro_batch_size: int = 16
        """Samples per forward on each rank (unless max_tokens_per_micro_batch is set)."""
        max_tokens_per_micro_batch: int | None = None
        """Token budget of one forward, balanced across ranks (as the actor's); None:
        micro_batch_size samples each."""
        packing: bool = True
        """Run each forward on packed rows instead of the padded layout (the same log-probs);
        false: padded."""
        anchor: Literal["fixed", "reset", "ema"] = "fixed"
        """fixed: the initial policy; reset: copy the actor every anchor_every steps; ema:
        ref <- decay * ref + (1 - decay) * actor after every step."""
        anchor_every: int = 100
        ema_decay: float = 0.99
        model_path: str | None = None
        """A teacher: this local model folder (same tokenizer as the policy) instead of the initial
        actor; frozen (anchor must be fixed). None: the initial actor."""

        def __post_init__(self) -> None:
            at_least(self, 1, "micro_batch_size", "anchor_every", "max_tokens_per_micro_batch")
            between(self, 0, 1, "ema_decay", open_high=True)
            if self.model_path is not None and self.anchor != "fixed":
                raise ValueError(f"reference.model_path (a teacher) is frozen; reference.anchor={self.anchor!r} "
                                 f"would overwrite it with the actor: use anchor=fixed")

        def source(self, policy: ModelConfig) -> ModelConfig:
            """The model the reference is built from: `policy`, or the teacher folder in its place."""
            return dataclasses.replace(policy, path=self.model_path) if self.model_path else policy

    def __init__(self, cfg: Config, model: torch.nn.Module, *, temperature: float = 1.0) -> None:
        if cfg.model_path is not None and not _loaded_from(model, cfg.model_path):
            raise ValueError(f"reference.model_path={cfg.model_path!r} is set, but the reference model was built "
                             f"from {getattr(getattr(model, 'config', None), '_name_or_path', None)!r}: the builder "
                             f"must build it from Reference.Config.source(model config)")
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature
        self.one_row = varlen_attention(model)
        self.share_prompts = full_attention_only(model)
        """Each distinct prompt once where that runs fewer tokens (as the actor's share_prompts;
        the same log-probs up to float rounding, and no backward pass here to weigh)."""
        self.steps = 0
        self.resets = 0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.resets = state["steps"], state["resets"]

    def sharded_state(self) -> ShardedState | None:
        """The weights, when they move (a dynamic anchor); a fixed reference is the initial policy."""
        return None if self.cfg.anchor == "fixed" else ShardedState(self.model)

    @torch.no_grad()
    def log_probs(self, batch: Batch) -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the reference policy."""
        def logp(mb: Batch, packed: PackedSamples | None) -> torch.Tensor:
            return response_logprobs(self.model, mb, packed, temperature=self.temperature)[0]
        return map_micro_batches(batch, self.cfg, logp, one_row=self.one_row, share_prompts=self.share_prompts)

    @torch.no_grad()
    def follow(self, actor: Any) -> None:
        """One training step passed: apply the anchor rule."""
        self.steps += 1
        if self.cfg.anchor == "reset" and self.steps % self.cfg.anchor_every == 0:
            self._blend(actor.model, 1.0)
            self.resets += 1
        elif self.cfg.anchor == "ema":
            self._blend(actor.model, 1.0 - self.cfg.ema_decay)

    def _blend(self, source: torch.nn.Module, weight: float) -> None:
        for (name, mine), (other_name, theirs) in zip(self.model.named_parameters(),
                                                       source.named_parameters()):
            assert name == other_name, (name, other_name)
            local, src = _local(mine), _local(theirs).to(_local(mine).dtype)
            local.copy_(src) if weight == 1.0 else local.lerp_(src, weight)


def _loaded_from(model: torch.nn.Module, folder: str) -> bool:
    """The model was loaded from `folder` (Hugging Face records it as config._name_or_path)."""
    loaded = getattr(getattr(model, "config", None), "_name_or_path", None)
    return bool(loaded) and Path(str(loaded)).expanduser().resolve() == Path(folder).expanduser().resolve()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
