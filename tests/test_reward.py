"""The reward role: scorers that raise or hang score 0 and are counted; training goes on."""
from __future__ import annotations

import time

import pytest
import torch

from core.batch import Batch
from roles.reward import Reward
from roles.scorers import SCORERS, register_scorer

if "test_spin" not in SCORERS:
    @register_scorer("test_spin")
    def spin(response: str, ground_truth: str) -> float:
        """Burns CPU forever when asked to (a pathological verifier); else exact match."""
        if response == "hang":
            while True:
                pass
        if response == "boom":
            raise ValueError("scorer bug")
        return float(response == ground_truth)


def batch(texts: list[str]) -> Batch:
    return Batch(response_text=texts, ground_truth=["ok"] * len(texts), data_source=["test_spin"] * len(texts))


def test_in_process_scorer_errors_are_counted():
    out = Reward(Reward.Config()).score(batch(["ok", "boom", "no"]))
    assert out.value.tolist() == [1.0, 0.0, 0.0]
    assert out.counts == {"reward/errors": 1.0, "reward/timeouts": 0.0}


def test_worker_pool_enforces_a_per_sample_time_limit():
    reward = Reward(Reward.Config(workers=2, timeout_s=0.5))
    try:
        t0 = time.perf_counter()
        out = reward.score(batch(["ok", "hang", "boom", "no", "hang", "ok"]))
        took = time.perf_counter() - t0
        assert out.value.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert out.counts == {"reward/errors": 1.0, "reward/timeouts": 2.0}
        assert took < 10
        again = reward.score(batch(["ok", "no"]))  # the pool keeps working
        assert again.value.tolist() == [1.0, 0.0] and again.counts["reward/timeouts"] == 0
    finally:
        reward._pool.close()


def test_math_scorer_in_workers_on_real_answers():
    reward = Reward(Reward.Config(scorer="math", workers=2))
    try:
        b = Batch(response_text=["so \\boxed{\\frac{1}{2}}", "\\boxed{3}"], ground_truth=["0.5", "4"],
                  data_source=["x", "x"])
        assert reward.score(b).value.tolist() == [1.0, 0.0]
    finally:
        reward._pool.close()


def test_unknown_scorer_fails_at_start_up():
    with pytest.raises(ValueError, match="valid names"):
        Reward(Reward.Config(scorer="maths"))
    assert torch.equal(Reward(Reward.Config()).score(batch(["ok"])).value, torch.tensor([1.0]))
