"""The LR schedule (`core/optim.py` lr_lambda and the TrainState scheduler it feeds), by hand.

Multiplier of lr at optimizer step s (0-based), W warm-up steps, T scheduled steps, floor f:
    s < W:   (s + 1) / (W + 1)                       linear warm-up from ~0
    else:    f + (1 - f) * decay(min(1, (s - W) / (T - W)))
             decay(x) = 1 (constant), 1 - x (linear), (1 + cos(pi x)) / 2 (cosine)
so the floor f * lr is reached at s = T, the value `lr` reports after the last optimizer step.
T = run steps x mini_batches x epochs: the scheduler counts optimizer steps, not training steps.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from core import dist
from core.batch import Batch
from core.optim import OptimConfig, TrainState, lr_lambda

# W = 2, T = 10, f = 0.1. Warm-up: 1/3, 2/3; s = 2 starts the decay at x = 0.
# cosine: s = 4 -> x = 1/4, decay (1 + cos(pi/4)) / 2 = (1 + 0.7071068) / 2 = 0.8535534,
#         multiplier 0.1 + 0.9 * 0.8535534 = 0.8681981; s = 6 -> x = 1/2, decay 1/2 -> 0.55;
#         s = 9 -> x = 7/8, decay (1 + cos(7 pi / 8)) / 2 = (1 - 0.9238795) / 2 = 0.0380602,
#         multiplier 0.1342542; s = 10 and beyond -> 0.1
# linear: s = 4 -> 0.1 + 0.9 * 0.75 = 0.775; s = 6 -> 0.55; s = 9 -> 0.1 + 0.9 / 8 = 0.2125; 0.1
# constant: 1 after the warm-up, never decays (the floor does not apply)
SCHEDULES = {
    "constant": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 1.0, 6: 1.0, 9: 1.0, 10: 1.0, 15: 1.0},
    "cosine": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.8681981, 6: 0.55, 9: 0.1342542, 10: 0.1, 15: 0.1},
    "linear": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.775, 6: 0.55, 9: 0.2125, 10: 0.1, 15: 0.1},
}


@pytest.mark.parametrize("shape", sorted(SCHEDULES))
def test_lr_lambda_warmup_mid_decay_and_floor(shape):
    f = lr_lambda(OptimConfig(lr=1e-3, warmup_steps=2, lr_schedule=shape, min_lr_ratio=0.1), 10)
    for step, expect in SCHEDULES[shape].items():
        assert f(step) == pytest.approx(expect, rel=1e-6), f"{shape} step {step}"


@pytest.mark.parametrize("shape, mid", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_lr_lambda_without_warmup_or_floor(shape, mid):
    """W = 0, f = 0: the full lr at step 0, half at T/2 (cosine and linear agree there), 0 at T."""
    f = lr_lambda(OptimConfig(lr=1.0, lr_schedule=shape), 8)
    assert f(0) == 1.0
    assert f(4) == pytest.approx(mid)
    assert f(2) == pytest.approx({"cosine": (1 + math.cos(math.pi / 4)) / 2, "linear": 0.75,
                                  "constant": 1.0}[shape])
    assert f(8) == pytest.approx(0.0 if shape != "constant" else 1.0, abs=1e-12)


def test_lr_lambda_warmup_longer_than_the_run_stays_at_lr_after_it():
    f = lr_lambda(OptimConfig(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1), 3)
    assert [f(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


@pytest.fixture
def one_process(monkeypatch):
    """TrainState.update outside a process group: world size 1, all-reduces are identities."""
    monkeypatch.setattr(dist, "info", lambda: SimpleNamespace(world_size=1, rank=0, is_main=True))
    monkeypatch.setattr(dist, "all_reduce_scalars", lambda values, op="sum": dict(values))


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_train_state_schedule_spans_steps_times_mini_batches_times_epochs(one_process, shape):
    """3 training steps x 2 mini-batches x 2 epochs = 12 optimizer steps, W = 2, f = 0.1, lr 0.5:
    every optimizer step uses lr * multiplier(s) for s = 0..11 and the lr reported after the last
    training step is the floor. A schedule spanning only the 3 training steps (or steps x
    mini_batches) would reach the floor after the first update."""
    # the update guard off: an lr of 0.5 on a 3-weight model moves it by more than its norm
    cfg = OptimConfig(lr=0.5, warmup_steps=2, lr_schedule=shape, min_lr_ratio=0.1, mini_batches=2, epochs=2,
                      max_update_ratio=None,
                      micro_batch_size=4, grad_clip=0.0)
    model = torch.nn.Linear(2, 1)
    state = TrainState(model, cfg, total_steps=3)
    used: list[float] = []

    def micro_loss(mb, counts, packed):
        used.append(state.optimizer.param_groups[0]["lr"])
        return (model.weight ** 2).sum() * 1e-3, {}

    batch = Batch(response_mask=torch.ones(4, 2), advantages=torch.zeros(4, 2))
    reported = [state.update(batch, micro_loss)["lr"] for _ in range(3)]

    def decay(x):  # x = (s - 2) / 10
        return (1 + math.cos(math.pi * x)) / 2 if shape == "cosine" else 1 - x
    expect = [1 / 3, 2 / 3] + [0.1 + 0.9 * decay((s - 2) / 10) for s in range(2, 12)]
    assert used == pytest.approx([0.5 * m for m in expect], rel=1e-6)
    assert state.version == 12
    # after update k (4k optimizer steps) the scheduler points at step 4k: 4, 8, then 12 = T
    assert reported == pytest.approx([0.5 * (0.1 + 0.9 * decay(x)) for x in (0.2, 0.6, 1.0)], rel=1e-6)
    assert reported[-1] == pytest.approx(0.05)


def test_train_state_schedule_resumes_from_its_state(one_process):
    """The scheduler state saved in local_state continues the schedule where it stopped."""
    cfg = OptimConfig(lr=1.0, lr_schedule="linear", warmup_steps=1, mini_batches=1, micro_batch_size=4,
                      max_update_ratio=None)
    a = TrainState(torch.nn.Linear(2, 1), cfg, total_steps=5)
    for _ in range(3):
        a.step()
    b = TrainState(torch.nn.Linear(2, 1), cfg, total_steps=5)
    b.load_local_state(a.local_state())
    # s = 3: x = (3 - 1) / 4 = 0.5 -> 0.5; then s = 4 -> 0.25
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    b.step()
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(0.25) and b.version == 4

