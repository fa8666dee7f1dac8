"""Advantages, KL estimators, PPO clip and loss aggregation against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.advantages import grpo_advantages
from algorithms.losses import aggregate, kl_penalty, ppo_clip_loss
from core.batch import GlobalCounts

EPS = 1e-6


def test_grpo_advantages_hand_computed():
    # groups: 7 -> [1, 0, 1, 1]; 3 -> [0, 0] (all equal); 9 -> [5] (a group of one);
    # 4 -> [2, 4] interleaved with the others (groups need not be contiguous).
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 5.0, 2.0, 4.0])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 9, 4, 4])
    mask = torch.ones(9, 2)
    mask[0, 1] = 0
    adv = grpo_advantages(rewards, groups, mask)
    # group 7: mean 0.75, unbiased std = sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    # group 4: mean 3, unbiased std = sqrt((1 + 1) / 1) = sqrt(2)
    expect = torch.tensor([0.25 / (0.5 + EPS), -0.75 / (0.5 + EPS), 0.25 / (0.5 + EPS), 0.25 / (0.5 + EPS),
                           0.0, 0.0, 0.0, -1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS)])
    torch.testing.assert_close(adv[:, 0], expect)
    assert adv[0, 1] == 0  # masked token
    torch.testing.assert_close(adv[1:, 1], expect[1:])


def test_drgrpo_advantages_do_not_divide_by_std():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(4), torch.ones(4, 1),
                          norm_std=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.25, -0.75, 0.25, 0.25]))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("mode, expect", [
    ("token-mean", 15 / 5),                    # (1+2+3+4+5) / 5 tokens
    ("seq-mean-token-mean", (6 / 3 + 9 / 2) / 2),
    ("seq-mean-token-sum", (6 + 9) / 2),
    ("seq-mean-token-sum-norm", (6 + 9) / 2 / 4),  # C = 4
])
def test_aggregation_modes_hand_computed(mode, expect):
    counts = GlobalCounts(tokens=5, seqs=2)
    assert float(aggregate(LOSS, MASK, mode, counts, norm_const=4)) == pytest.approx(expect)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregation_is_invariant_to_micro_batching(mode):
    """Shares of micro-batches with the step's global counts add up to the full value, and so
    do their gradients (the gradient-accumulation bug this contract prevents)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    counts = GlobalCounts(tokens=float(mask.sum()), seqs=6.0)
    full = aggregate(x, mask, mode, counts, norm_const=5)
    (grad_full,) = torch.autograd.grad(full, x)
    parts = sum(aggregate(x[i:i + 2], mask[i:i + 2], mode, counts, norm_const=5) for i in (0, 2, 4))
    (grad_parts,) = torch.autograd.grad(parts, x)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(grad_parts, grad_full)
    # the naive per-micro-batch mean differs for token-mean (the bug being guarded against)
    if mode == "token-mean":
        naive = sum(aggregate(x[i:i + 2], mask[i:i + 2], mode,
                              GlobalCounts(tokens=float(mask[i:i + 2].sum()), seqs=2.0)) for i in (0, 2, 4)) / 3
        assert not torch.allclose(naive, full)


def test_aggregation_ignores_nan_in_padding():
    loss = torch.tensor([[1.0, float("nan")]])
    assert float(aggregate(loss, torch.tensor([[1, 0]]), "token-mean", GlobalCounts(tokens=1, seqs=1))) == 1.0


def test_kl_estimators_hand_computed():
    logp = torch.tensor([-1.0, -2.0, 0.0])
    ref = torch.tensor([-1.5, -1.0, 0.0])
    d = torch.tensor([0.5, -1.0, 0.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    k3 = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 0.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)


def test_k3_clamps():
    # d = -30 is clamped to -20 first: exp(20) - 20 - 1 ~ 4.9e8, then the result to 10.
    assert float(kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")) == 10.0
    # d = +30 -> clamped to 20: exp(-20) + 20 - 1 = 19.000000002 -> 10
    assert float(kl_penalty(torch.tensor([30.0]), torch.tensor([0.0]), "k3")) == 10.0
    # within range nothing is clamped: d = 2 -> exp(-2) + 1
    assert float(kl_penalty(torch.tensor([2.0]), torch.tensor([0.0]), "k3")) == pytest.approx(math.exp(-2) + 1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_ppo_clip_hand_computed():
    # ratios e^{logp - old}: 1.5, 0.5, 1.1, 0.5 ; advantages +1, +1, -2, -2
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    loss, flags = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # A>0, rho=1.5: max(-1.5, -1.28) = -1.28 (clipped above)
    # A>0, rho=0.5: max(-0.5, -0.8) = -0.5
    # A<0, rho=1.1: max(2.2, 2.2) = 2.2
    # A<0, rho=0.5: max(1.0, 1.6) = 1.6 (clipped below)
    torch.testing.assert_close(loss, torch.tensor([-1.28, -0.5, 2.2, 1.6]))
    assert flags["pg_clipfrac_upper"].tolist() == [True, False, False, False]
    assert flags["pg_clipfrac_lower"].tolist() == [False, False, False, True]


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, rho = 5: plain PPO gives max(5, 1.2) = 5; dual clip c=3 caps it at -A*c = 3.
    loss, flags = ppo_clip_loss(torch.log(torch.tensor([5.0, 2.0])), torch.zeros(2),
                                torch.tensor([-1.0, -1.0]), dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([3.0, 2.0]))
    assert flags["pg_clipfrac_dual"].tolist() == [True, False]
    # positive advantages are untouched by the dual clip
    loss_pos, _ = ppo_clip_loss(torch.log(torch.tensor([5.0])), torch.zeros(1), torch.tensor([1.0]),
                                dual_clip=3.0)
    torch.testing.assert_close(loss_pos, torch.tensor([-1.2]))


def test_log_ratio_is_clamped_before_exp():
    loss, _ = ppo_clip_loss(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([-1.0]))
    assert torch.isfinite(loss).all() and float(loss) == pytest.approx(math.exp(20), rel=1e-5)
