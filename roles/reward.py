"""The reward role: per-sample scores from rule scorers chosen by data source.

Scoring runs in-process (`workers: 0`, for cheap scorers such as the built-in task's) or in a
pool of worker processes with a per-sample CPU-time limit. Either way a scorer that raises or
runs out of time yields 0 for that sample and is counted (`reward/errors`, `reward/timeouts`);
training never stops because of a scorer. In the pool, the limit is a CPU-time timer in the
worker (SIGVTALRM, separate from the wall-clock alarm math-verify uses for its own limits), and a
wall-clock backstop for the whole batch replaces the pool if a worker is stuck in C code.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import roles.code_scorer  # noqa: F401  (registers the "code" scorer)
from core.batch import Batch
from core.graph import Result
from roles.scorers import Scorer, get_scorer, register_scorer, scorer_names  # noqa: F401  (public API)

logger = logging.getLogger(__name__)

ERROR, TIMEOUT = "error", "timeout"


class Reward:
    @dataclass(kw_only=True, slots=True)
    class Config:
        scorer: str | None = None
        """Scorer for every sample; None: the scorer named by each sample's data_source."""
        source_scorers: dict[str, str] = field(default_factory=dict)
        """Per data_source scorer names, e.g. {gsm8k: math}; overrides `scorer`."""
        workers: int = 0
        """Scoring processes; 0 scores in this process (no time limit beyond the scorer's own)."""
        timeout_s: float = 10.0
        """CPU seconds one sample may take in a worker before it scores 0."""

    def __init__(self, cfg: Config, *, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        for name in {cfg.scorer, *cfg.source_scorers.values()} - {None}:
            get_scorer(name)  # fail at start-up on a typo, not at step 1
        self._pool = ScoringPool(cfg.workers, cfg.timeout_s) if cfg.workers > 0 else None

    def scorer_for(self, data_source: str) -> str:
        return self.cfg.source_scorers.get(data_source) or self.cfg.scorer or data_source

    def score(self, batch: Batch) -> Result:
        """scores [B] float32 for response_text against ground_truth."""
        jobs = [(get_scorer(self.scorer_for(src)), text, truth)
                for text, truth, src in zip(batch.response_text, batch.ground_truth, batch.data_source)]
        outcomes = self._pool.map(jobs) if self._pool else [score_one(*job) for job in jobs]
        values = [o if isinstance(o, float) else 0.0 for o in outcomes]
        counts = {"reward/errors": float(sum(o == ERROR for o in outcomes)),
                  "reward/timeouts": float(sum(o == TIMEOUT for o in outcomes))}
        return Result(torch.tensor(values, dtype=torch.float32, device=self.device), counts=counts)


def score_one(scorer: Scorer, text: str, truth: Any) -> float | str:
    """A float, or ERROR when the scorer raised (logged), or TIMEOUT."""
    try:
        return float(scorer(text, truth))
    except _SampleTimeout:
        return TIMEOUT
    except Exception:  # a scorer bug must never stop training
        logger.exception("scorer %s raised; reward 0", getattr(scorer, "__name__", scorer))
        return ERROR


class _SampleTimeout(BaseException):
    """Not an Exception, so a scorer's own `except Exception` cannot swallow it."""


def _on_cpu_limit(signum: int, frame: Any) -> None:
    raise _SampleTimeout()


def _score_limited(scorer: Scorer, text: str, truth: Any, limit_s: float) -> float | str:
    """Worker side: score one sample under a CPU-time timer."""
    signal.signal(signal.SIGVTALRM, _on_cpu_limit)
    signal.setitimer(signal.ITIMER_VIRTUAL, limit_s)
    try:
        return score_one(scorer, text, truth)
    except _SampleTimeout:  # fired outside the scorer's own try
        return TIMEOUT
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)


class ScoringPool:
    """Worker processes (forkserver: no copy of the trainer's threads or CUDA state)."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self._pool: Any = None

    def _ensure(self) -> Any:
        if self._pool is None:
            self._pool = mp.get_context("forkserver").Pool(self.workers)
        return self._pool

    def map(self, jobs: list[tuple[Scorer, str, Any]]) -> list[float | str]:
        pool = self._ensure()
        pending = [pool.apply_async(_score_limited, (*job, self.timeout_s)) for job in jobs]
        # Backstop: every sample may use its limit, `workers` at a time, plus slack.
        deadline = time.monotonic() + self.timeout_s * (len(jobs) / self.workers + 2) + 5
        out: list[float | str] = []
        for p in pending:
            try:
                out.append(p.get(timeout=max(0.0, deadline - time.monotonic())))
            except mp.TimeoutError:
                out.append(TIMEOUT)
        if any(not p.ready() for p in pending):
            logger.warning("scoring workers stuck past the deadline: replacing the pool")
            self.close()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
