"""The reward role: per-sample scores from rule scorers chosen by data source.

A scorer that raises yields reward 0 for that sample and is counted in `reward/errors`;
training never stops because of a scorer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from core.batch import Batch
from core.graph import Result
import roles.sandbox  # noqa: F401  (registers the "code" scorer)
from roles.scorers import get_scorer, register_scorer, scorer_names  # noqa: F401  (public API)

logger = logging.getLogger(__name__)


class Reward:
    @dataclass(kw_only=True, slots=True)
    class Config:
        scorer: str | None = None
        """Scorer for every sample; None: the scorer named by each sample's data_source."""
        source_scorers: dict[str, str] = field(default_factory=dict)
        """Per data_source scorer names, e.g. {gsm8k: math}; overrides `scorer`."""

    def __init__(self, cfg: Config, *, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        for name in {cfg.scorer, *cfg.source_scorers.values()} - {None}:
            get_scorer(name)  # fail at start-up on a typo, not at step 1

    def scorer_for(self, data_source: str) -> str:
        return self.cfg.source_scorers.get(data_source) or self.cfg.scorer or data_source

    def score(self, batch: Batch) -> Result:
        """rewards [B] float32 for response_text against ground_truth."""
        rewards, errors = [], 0
        for text, truth, source in zip(batch.response_text, batch.ground_truth, batch.data_source):
            try:
                rewards.append(float(get_scorer(self.scorer_for(source))(text, truth)))
            except Exception:  # a scorer bug must never stop training
                logger.exception("scorer for %r raised; reward 0", source)
                rewards.append(0.0)
                errors += 1
        r_B = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        return Result(r_B, counts={"reward/errors": float(errors)})
