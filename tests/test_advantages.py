"""Advantage estimators (GAE, decoupled / length-adaptive GAE, RLOO, REINFORCE++, whitening)
against hand-computed numbers, worked out in the comments rather than recomputed by formula."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.advantages import (decoupled_gae, gae, last_token_rewards, length_adaptive_lambda,
                                   reinforce_pp_advantages, rloo_advantages, whiten)
from core import dist
from tests.dist_utils import run_distributed

NAN = float("nan")


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# last_token_rewards


def test_last_token_rewards_places_reward_on_last_real_token():
    mask_BR = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out_BR = last_token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask_BR)
    # lengths 3, 2, 1, 0: the reward lands on index 2, 1, 0; the empty row gets nothing.
    close(out_BR, [[0, 0, 1], [0, 2, 0], [3, 0, 0], [0, 0, 0]])
    assert out_BR.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_gamma_lambda_one_is_return_minus_value():
    # One sequence of 3 tokens, reward 1 at the last token, V = [0.5, 0.2, 0.9]:
    # with gamma = lam = 1, A_t = (sum of future rewards) - V_t = 1 - V_t.
    adv_BR, ret_BR = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.9]]),
                         torch.ones(1, 3, dtype=torch.long), gamma=1.0, lam=1.0)
    close(adv_BR, [[1 - 0.5, 1 - 0.2, 1 - 0.9]])
    close(ret_BR, [[1.0, 1.0, 1.0]])


def test_gae_gamma_lambda_one_with_padding():
    # Row 1 has 2 real tokens padded to 3; its padding holds garbage (NaN value, reward 5) that
    # must be ignored. Its reward 1 sits on token 1, V = [0.3, 0.7]: A = [1 - 0.3, 1 - 0.7, 0].
    mask_BR = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards_BR = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values_BR = torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.7, NAN]])
    adv_BR, ret_BR = gae(rewards_BR, values_BR, mask_BR, gamma=1.0, lam=1.0)
    close(adv_BR, [[0.5, 0.8, 0.1], [0.7, 0.3, 0.0]])
    close(ret_BR, [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_gae_hand_worked_gamma_09_lambda_08():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    # Row 0: V = [0.5, 0.2, 0.9], reward 1 on token 2.
    #   delta_2 = 1 + 0.9 * 0   - 0.9 =  0.1     (V = 0 past the end)
    #   delta_1 = 0 + 0.9 * 0.9 - 0.2 =  0.61
    #   delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32
    #   A_2 = 0.1
    #   A_1 = 0.61  + 0.72 * 0.1   = 0.682
    #   A_0 = -0.32 + 0.72 * 0.682 = -0.32 + 0.49104 = 0.17104
    #   returns = A + V = [0.67104, 0.882, 1.0]
    # Row 1 (length 2): V = [0.4, 0.6], reward 2 on token 1.
    #   delta_1 = 2 + 0.9 * 0   - 0.6 = 1.4
    #   delta_0 = 0 + 0.9 * 0.6 - 0.4 = 0.14
    #   A_1 = 1.4
    #   A_0 = 0.14 + 0.72 * 1.4 = 1.148
    #   returns = [1.548, 2.0, 0]
    mask_BR = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards_BR = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values_BR = torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.6, 7.0]])
    adv_BR, ret_BR = gae(rewards_BR, values_BR, mask_BR, gamma=0.9, lam=0.8)
    close(adv_BR, [[0.17104, 0.682, 0.1], [1.148, 1.4, 0.0]])
    close(ret_BR, [[0.67104, 0.882, 1.0], [1.548, 2.0, 0.0]])


def test_gae_carries_values_and_advantages_across_an_interior_masked_span():
    # A multi-turn sample: two sampled turns around a tool observation, mask [1,1,0,0,1,1,0];
    # the observation's positions hold garbage (value 9, reward 5) that must be ignored, and
    # "t+1" of token 1 is token 4 (the next sampled token), gamma = 0.9, lam = 0.8 (0.72):
    #   delta_5 = 1 + 0         - 0.6 =  0.4     A_5 = 0.4
    #   delta_4 = 0 + 0.9 * 0.6 - 0.4 =  0.14    A_4 = 0.14  + 0.72 * 0.4   = 0.428
    #   delta_1 = 0 + 0.9 * 0.4 - 0.2 =  0.16    A_1 = 0.16  + 0.72 * 0.428 = 0.46816
    #   delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32    A_0 = -0.32 + 0.72 * 0.46816 = 0.0170752
    # (treating token 1 as terminal instead would give A_1 = -0.2: the old convention).
    mask_BR = torch.tensor([[1, 1, 0, 0, 1, 1, 0]])
    rewards_BR = torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.0, 1.0, 5.0]])
    values_BR = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.4, 0.6, 9.0]])
    adv_BR, ret_BR = gae(rewards_BR, values_BR, mask_BR, gamma=0.9, lam=0.8)
    close(adv_BR, [[0.0170752, 0.46816, 0, 0, 0.428, 0.4, 0]])
    close(ret_BR, [[0.5170752, 0.66816, 0, 0, 0.828, 1.0, 0]])
    # gamma = lam = 1: every sampled token's advantage is the whole future reward minus its value
    adv_BR, ret_BR = gae(rewards_BR, values_BR, mask_BR, gamma=1.0, lam=1.0)
    close(adv_BR, [[0.5, 0.8, 0, 0, 0.6, 0.4, 0]])
    close(ret_BR, [[1.0, 1.0, 0, 0, 1.0, 1.0, 0]])


def test_gae_per_sequence_lambda():
    # Same row twice, gamma 1: deltas [0.2 - 0.5, 0.9 - 0.2, 1 - 0.9] = [-0.3, 0.7, 0.1].
    # lam 0.5: A_2 = 0.1, A_1 = 0.7 + 0.5 * 0.1 = 0.75, A_0 = -0.3 + 0.5 * 0.75 = 0.075.
    # lam 0:   A = deltas.
    rewards_BR = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    values_BR = torch.tensor([[0.5, 0.2, 0.9]] * 2)
    adv_BR, ret_BR = gae(rewards_BR, values_BR, torch.ones(2, 3), gamma=1.0, lam=torch.tensor([0.5, 0.0]))
    close(adv_BR, [[0.075, 0.75, 0.1], [-0.3, 0.7, 0.1]])
    close(ret_BR, [[0.575, 0.95, 1.0], [0.2, 0.9, 1.0]])
    with pytest.raises(ValueError, match="lam must be"):
        gae(rewards_BR, values_BR, torch.ones(2, 3), gamma=1.0, lam=torch.tensor([0.5, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# VAPO: decoupled and length-adaptive GAE


def test_decoupled_gae_returns_use_lam_critic_advantages_lam_policy():
    # gamma 1, V = [0.5, 0.2, 0.9], reward 1 at the end: deltas [-0.3, 0.7, 0.1] (as above).
    # Policy, lam 0.5: A = [0.075, 0.75, 0.1].
    # Critic, lam 1: A_critic = [0.5, 0.8, 0.1], returns = A_critic + V = [1, 1, 1]
    # (with lam_policy's A the returns would have been [0.575, 0.95, 1.0]).
    adv_BR, ret_BR = decoupled_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.9]]),
                                   torch.ones(1, 3), gamma=1.0, lam_critic=1.0, lam_policy=0.5)
    close(adv_BR, [[0.075, 0.75, 0.1]])
    close(ret_BR, [[1.0, 1.0, 1.0]])


def test_decoupled_gae_with_length_adaptive_lambda():
    # Row lengths 3 and 2; alpha 1: lam_policy = [1 - 1/3, 1 - 1/2] = [2/3, 1/2].
    # gamma 1. Row 0: V = [0.5, 0.2, 0.9], deltas [-0.3, 0.7, 0.1]:
    #   A_2 = 0.1, A_1 = 0.7 + (2/3) 0.1 = 23/30 = 0.766667,
    #   A_0 = -0.3 + (2/3)(23/30) = -27/90 + 46/90 = 19/90 = 0.211111.
    # Row 1: V = [0.4, 0.6], reward 2: deltas [0.6 - 0.4, 2 - 0.6] = [0.2, 1.4]:
    #   A_1 = 1.4, A_0 = 0.2 + 0.5 * 1.4 = 0.9.
    # Critic lam 1: returns = sum of future rewards = [1, 1, 1] and [2, 2, 0].
    mask_BR = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lam_B = length_adaptive_lambda(mask_BR.sum(1), alpha=1.0)
    close(lam_B, [2 / 3, 0.5])
    adv_BR, ret_BR = decoupled_gae(torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]),
                                   torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.6, 0.0]]), mask_BR,
                                   gamma=1.0, lam_critic=1.0, lam_policy=lam_B)
    close(adv_BR, [[19 / 90, 23 / 30, 0.1], [0.9, 1.4, 0.0]])
    close(ret_BR, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])


def test_length_adaptive_lambda_values_and_clamp():
    # alpha 0.05: l = 100 -> 1 - 1/5 = 0.8; l = 200 -> 1 - 1/10 = 0.9;
    # l = 10 -> 1 - 1/0.5 = -1, clamped to 0; l = 20 -> exactly 0; l = 0 (empty row) -> 0.
    lam_B = length_adaptive_lambda(torch.tensor([100, 200, 10, 20, 0]), alpha=0.05)
    close(lam_B, [0.8, 0.9, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(torch.tensor([100]), alpha=0.0)


# ---------------------------------------------------------------------------------------------
# RLOO


def test_rloo_one_group_leave_one_out_identity():
    rewards_B = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv_BR = rloo_advantages(rewards_B, torch.zeros(4, dtype=torch.long), torch.ones(4, 2))
    # mean of the other three: [2/3, 1, 2/3, 2/3]
    expect = [1 - 2 / 3, 0 - 1, 1 - 2 / 3, 1 - 2 / 3]
    close(adv_BR[:, 0], expect)
    close(adv_BR[:, 1], expect)
    # = G / (G - 1) (r - mean_g) = 4/3 * ([1, 0, 1, 1] - 0.75)
    close(adv_BR[:, 0], [4 / 3 * 0.25, 4 / 3 * -0.75, 4 / 3 * 0.25, 4 / 3 * 0.25])


def test_rloo_group_of_one_and_interleaved_groups():
    # ids [0, 1, 0, 1, 0, 9], rewards [1, 2, 0, 5, 2, 3]:
    # group 0 (idx 0, 2, 4) = {1, 0, 2}: A = 1 - (0 + 2)/2 = 0, 0 - (1 + 2)/2 = -1.5, 2 - (1 + 0)/2 = 1.5
    # group 1 (idx 1, 3) = {2, 5}: A = 2 - 5 = -3, 5 - 2 = 3
    # group 9 (idx 5) alone: 0
    rewards_B = torch.tensor([1.0, 2.0, 0.0, 5.0, 2.0, 3.0])
    mask_BR = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])
    adv_BR = rloo_advantages(rewards_B, torch.tensor([0, 1, 0, 1, 0, 9]), mask_BR)
    close(adv_BR, [[0, 0], [-3, -3], [-1.5, 0], [3, 3], [1.5, 1.5], [0, 0]])


# ---------------------------------------------------------------------------------------------
# whiten


def test_whiten_hand_example():
    # Real tokens [1, 2, 3, 4, 5] (99 is padding): mean 3,
    # population var = (4 + 1 + 0 + 1 + 4) / 5 = 2, std = sqrt(2).
    x_BR = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask_BR = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = math.sqrt(2)
    close(whiten(x_BR, mask_BR), [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    # shift_mean=False keeps the mean: 3 + (x - 3) / sqrt(2); padding still 0.
    close(whiten(x_BR, mask_BR, shift_mean=False),
          [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]])


def test_whiten_single_token_and_no_tokens_are_finite():
    # One real token: x - mean = 0 and std = 0, so 0 / (0 + eps) = 0.
    close(whiten(torch.tensor([[5.0, NAN]]), torch.tensor([[1, 0]])), [[0.0, 0.0]])
    # No real token anywhere: zeros, not 0 / 0.
    close(whiten(torch.tensor([[5.0, 2.0]]), torch.zeros(1, 2)), [[0.0, 0.0]])


def _whiten_and_reinforce_pp_per_rank(x_BR: torch.Tensor, mask_BR: torch.Tensor, rewards_B: torch.Tensor,
                                      kl_BR: torch.Tensor, split: int) -> dict[str, torch.Tensor]:
    """On each of 2 ranks: whiten this rank's rows (rank 0 rows [:split], rank 1 the rest)."""
    rows = slice(0, split) if dist.info().rank == 0 else slice(split, None)
    adv_BR, _ = reinforce_pp_advantages(rewards_B[rows], mask_BR[rows], kl_BR=kl_BR[rows], kl_coef=0.1)
    return {"global": whiten(x_BR[rows], mask_BR[rows]),
            "local": whiten(x_BR[rows], mask_BR[rows], distributed=False),
            "reinforce_pp": adv_BR}


@pytest.mark.dist
def test_distributed_whiten_equals_whiten_of_concatenation():
    g = torch.Generator().manual_seed(0)
    B, R, split = 5, 6, 2  # uneven halves: 2 rows on rank 0, 3 on rank 1
    x_BR = torch.randn(B, R, generator=g) * 3 + 1
    lengths_B = torch.tensor([6, 1, 4, 0, 3])
    mask_BR = (torch.arange(R)[None, :] < lengths_B[:, None]).long()
    rewards_B = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    kl_BR = torch.randn(B, R, generator=g) * 0.1
    rank0, rank1 = run_distributed(_whiten_and_reinforce_pp_per_rank, x_BR, mask_BR, rewards_B, kl_BR,
                                   split, world_size=2)
    whole_BR = whiten(x_BR, mask_BR)  # no process group here: the whole batch on one process
    torch.testing.assert_close(torch.cat([rank0["global"], rank1["global"]]), whole_BR)
    # Whitening each half alone differs: the global statistics really were used.
    assert not torch.allclose(torch.cat([rank0["local"], rank1["local"]]), whole_BR)
    whole_adv_BR, _ = reinforce_pp_advantages(rewards_B, mask_BR, kl_BR=kl_BR, kl_coef=0.1)
    torch.testing.assert_close(torch.cat([rank0["reinforce_pp"], rank1["reinforce_pp"]]), whole_adv_BR)


# ---------------------------------------------------------------------------------------------
# REINFORCE++


def test_reinforce_pp_returns_with_kl_penalty_and_whitened_advantages():
    # kl_coef 0.1, so each real token's reward is -0.1 * kl, plus r on the last token.
    # Row 0 (length 3), r = 1, kl = [0.2, -0.1, 0.3]:
    #   token rewards [-0.02, 0.01, 1 - 0.03] = [-0.02, 0.01, 0.97]
    #   returns (reverse cumsum): t2 = 0.97, t1 = 0.97 + 0.01 = 0.98, t0 = 0.98 - 0.02 = 0.96
    # Row 1 (length 2), r = 0, kl = [0.5, 0.1] (the 9.0 is padding):
    #   token rewards [-0.05, -0.01]; returns t1 = -0.01, t0 = -0.06
    mask_BR = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl_BR = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.1, 9.0]])
    adv_BR, ret_BR = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask_BR, kl_BR=kl_BR, kl_coef=0.1)
    close(ret_BR, [[0.96, 0.98, 0.97], [-0.06, -0.01, 0.0]])
    # Whitening over the 5 real returns [0.96, 0.98, 0.97, -0.06, -0.01]:
    #   mean = 2.84 / 5 = 0.568
    #   deviations [0.392, 0.412, 0.402, -0.628, -0.578], squares
    #   [0.153664, 0.169744, 0.161604, 0.394384, 0.334084], sum 1.21348, population var 0.242696
    s = math.sqrt(0.242696)
    close(adv_BR, [[0.392 / s, 0.412 / s, 0.402 / s], [-0.628 / s, -0.578 / s, 0.0]])
    real = mask_BR.bool()
    assert float(adv_BR[real].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv_BR[real].std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_reinforce_pp_without_kl_is_reward_to_go():
    # No KL: every real token's return is the sequence reward.
    adv_BR, ret_BR = reinforce_pp_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    close(ret_BR, [[2.0, 2.0], [-1.0, 0.0]])
    # real returns [2, 2, -1]: mean 1, deviations [1, 1, -2], population var (1 + 1 + 4) / 3 = 2
    s = math.sqrt(2)
    close(adv_BR, [[1 / s, 1 / s], [-2 / s, 0.0]])


def test_reinforce_pp_baseline_subtracts_group_mean_first():
    # Groups 7 = {1, 0} (mean 0.5) and 8 = {3, 1} (mean 2): r - mean_g = [0.5, -0.5, 1, -1].
    # Two real tokens each, no KL: returns = that value on both tokens.
    # Whitening: mean 0, population var = (2 * 0.25 + 2 * 0.25 + 2 * 1 + 2 * 1) / 8 = 0.625.
    rewards_B = torch.tensor([1.0, 0.0, 3.0, 1.0])
    groups_B = torch.tensor([7, 7, 8, 8])
    adv_BR, ret_BR = reinforce_pp_advantages(rewards_B, torch.ones(4, 2), group_ids_B=groups_B, baseline=True)
    close(ret_BR, [[0.5, 0.5], [-0.5, -0.5], [1.0, 1.0], [-1.0, -1.0]])
    s = math.sqrt(0.625)
    close(adv_BR, [[0.5 / s] * 2, [-0.5 / s] * 2, [1 / s] * 2, [-1 / s] * 2])
    # Without the baseline the returns are the raw rewards.
    _, ret_plain_BR = reinforce_pp_advantages(rewards_B, torch.ones(4, 2), group_ids_B=groups_B)
    close(ret_plain_BR, [[1.0, 1.0], [0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="group_ids_B"):
        reinforce_pp_advantages(rewards_B, torch.ones(4, 2), baseline=True)


# ---------------------------------------------------------------------------------------------
# All-masked rows: finite everywhere, zero at masked positions


@pytest.mark.parametrize("mask_BR", [torch.tensor([[1, 1, 0], [0, 0, 0]]),
                                     torch.zeros(2, 3, dtype=torch.long)], ids=["one-empty-row", "all-empty"])
def test_no_nan_for_all_masked_rows(mask_BR):
    rewards_B = torch.tensor([1.0, 1.0])
    # Garbage in the padding (NaN values and KL) must not leak out.
    values_BR = torch.tensor([[0.5, 0.2, NAN], [NAN, NAN, NAN]])
    kl_BR = torch.tensor([[0.1, 0.2, NAN], [NAN, NAN, NAN]])
    token_rewards_BR = last_token_rewards(rewards_B, mask_BR)
    groups_B = torch.tensor([0, 0])
    outputs = {
        "last_token_rewards": token_rewards_BR,
        "gae": gae(token_rewards_BR, values_BR, mask_BR, gamma=1.0, lam=0.95),
        "decoupled_gae": decoupled_gae(token_rewards_BR, values_BR, mask_BR, gamma=1.0, lam_critic=1.0,
                                       lam_policy=length_adaptive_lambda(mask_BR.sum(1), alpha=0.05)),
        "whiten": whiten(torch.tensor([[1.0, 2.0, NAN], [NAN, NAN, NAN]]), mask_BR),
        "rloo": rloo_advantages(torch.tensor([1.0, 0.0]), groups_B, mask_BR),
        "reinforce_pp": reinforce_pp_advantages(rewards_B, mask_BR, kl_BR=kl_BR, kl_coef=0.1),
        "reinforce_pp_baseline": reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask_BR, kl_BR=kl_BR,
                                                         kl_coef=0.1, group_ids_B=groups_B, baseline=True),
    }
    padding = ~mask_BR.bool()
    for name, out in outputs.items():
        for t in out if isinstance(out, tuple) else (out,):
            assert t.dtype == torch.float32, name
            assert torch.isfinite(t).all(), name
            assert (t[padding] == 0).all(), name
    assert length_adaptive_lambda(torch.tensor([0, 0]), alpha=0.05).isfinite().all()
