"""The reference policy: a frozen FSDP2 copy of the initial actor, for KL terms."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.batch import Batch
from core.models import batched_logprobs


class Reference:
    @dataclass(kw_only=True, slots=True)
    class Config:
        micro_batch_size: int = 16
        """Samples per forward on each rank."""

    def __init__(self, cfg: Config, model: torch.nn.Module, *, temperature: float = 1.0) -> None:
        self.cfg = cfg
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def log_probs(self, batch: Batch) -> torch.Tensor:
        """Log-probs [B, R] of the response tokens under the reference policy."""
        return batched_logprobs(self.model, batch, micro_batch_size=self.cfg.micro_batch_size,
                                temperature=self.temperature)
