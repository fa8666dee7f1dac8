"""The reward role: scorers that raise or hang score 0 and are counted; training goes on."""
from __future__ import annotations

import os
import time

import pytest
import torch

from core.batch import Batch
from roles.reward import Reward
from roles.reward.sandbox import SandboxUnavailable
from roles.reward.scorers import SCORERS, register_scorer

if "test_spin" not in SCORERS:
    @register_scorer("test_spin")
    def spin(response: str, ground_truth: str) -> float:
        """Burns CPU forever, sleeps, dies or raises when asked to (a pathological verifier);
        else exact match."""
        if response == "hang":
            while True:
                pass
        if response == "sleep":
            time.sleep(60)
        if response == "die":
            os._exit(1)
        if response == "boom":
            raise ValueError("scorer bug")
        if response == "no sandbox":
            raise SandboxUnavailable("code sandbox unavailable: test")
        return float(response == ground_truth)


def batch(texts: list[str]) -> Batch:
    return Batch(response_text=texts, ground_truth=["ok"] * len(texts), data_source=["test_spin"] * len(texts))


def test_in_process_scorer_errors_are_counted():
    out = Reward(Reward.Config()).score(batch(["ok", "boom", "no"]))
    assert out.value.tolist() == [1.0, 0.0, 0.0]
    assert out.counts == {"reward/errors": 1.0, "reward/timeouts": 0.0, "reward/nonfinite": 0.0}


def test_worker_pool_enforces_a_per_sample_time_limit():
    reward = Reward(Reward.Config(workers=2, timeout_s=0.5, wall_timeout_s=60))
    try:
        t0 = time.perf_counter()
        out = reward.score(batch(["ok", "hang", "boom", "no", "hang", "ok"]))
        took = time.perf_counter() - t0
        assert out.value.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert out.counts == {"reward/errors": 1.0, "reward/timeouts": 2.0, "reward/nonfinite": 0.0}
        assert took < 30  # 0.5 CPU seconds each; wall time depends on the machine's load
        again = reward.score(batch(["ok", "no"]))  # the pool keeps working
        assert again.value.tolist() == [1.0, 0.0] and again.counts["reward/timeouts"] == 0
    finally:
        reward._pool.close()


def test_sleeping_scorer_charges_only_the_samples_past_the_wall_limit():
    """Issue #14: 4 of 32 samples sleep (no CPU time, so only the wall limit sees them); with
    2 workers only those 4 are timeouts, the other 28 are scored."""
    reward = Reward(Reward.Config(workers=2, timeout_s=5, wall_timeout_s=1.5))
    texts = ["ok", "no"] * 14 + ["sleep"] * 4
    texts[3], texts[-1] = texts[-1], texts[3]  # sleepers early and late in the batch
    try:
        t0 = time.perf_counter()
        out = reward.score(batch(texts))
        took = time.perf_counter() - t0
        assert out.value.tolist() == [float(t == "ok") for t in texts]
        assert out.counts == {"reward/errors": 0.0, "reward/timeouts": 4.0, "reward/nonfinite": 0.0}
        assert took < 4 * 1.5 / 2 + 10
    finally:
        reward._pool.close()


def test_a_dying_worker_costs_only_its_sample():
    reward = Reward(Reward.Config(workers=2))
    try:
        out = reward.score(batch(["ok", "die", "ok", "no", "die", "ok"]))
        assert out.value.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        assert out.counts == {"reward/errors": 2.0, "reward/timeouts": 0.0, "reward/nonfinite": 0.0}
    finally:
        reward._pool.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_no_sandbox_stops_scoring_instead_of_scoring_zero(workers):
    reward = Reward(Reward.Config(workers=workers))
    try:
        with pytest.raises(SandboxUnavailable, match="code sandbox unavailable: test"):
            reward.score(batch(["ok", "no sandbox", "ok"]))
    finally:
        if reward._pool is not None:
            reward._pool.close()


def test_math_scorer_in_workers_on_real_answers():
    reward = Reward(Reward.Config(scorer="math", workers=2))
    try:
        b = Batch(response_text=["so \\boxed{\\frac{1}{2}}", "\\boxed{3}"], ground_truth=["0.5", "4"],
                  data_source=["x", "x"])
        assert reward.score(b).value.tolist() == [1.0, 0.0]
    finally:
        reward._pool.close()


@pytest.mark.parametrize("key, value", [("timeout_s", -1.0), ("wall_timeout_s", -5.0), ("workers", -1)])
def test_pool_limits_are_checked_when_the_config_loads(key, value):
    """A negative limit would make every sample a timeout: refused at load, with the full key."""
    from core.config import load_config
    from launch.config import JobConfig
    with pytest.raises(ValueError, match=rf"config key 'reward.{key}' must be >(=)? 0, got {value}"):
        load_config(JobConfig, None, ["reward.workers=2", f"reward.{key}={value}"])


def test_unknown_scorer_fails_at_start_up():
    with pytest.raises(ValueError, match="valid names"):
        Reward(Reward.Config(scorer="maths"))
    assert torch.equal(Reward(Reward.Config()).score(batch(["ok"])).value, torch.tensor([1.0]))
