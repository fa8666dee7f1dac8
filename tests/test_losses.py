"""Advantages, KL estimators, PPO clip and loss aggregation against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.advantages import grpo_advantages
from algorithms.losses import PolicyLoss, aggregate, kl_penalty, ppo_clip_loss
from core.batch import Batch, GlobalCounts

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


# ---------------------------------------------------------------------------------------------
# PolicyLoss with every term switched on: KL to the reference (k1/k2/k3), entropy bonus and
# positive-example NLL, under each aggregation mode; value, metrics and per-token gradients.
#
# The expectation is a plain-Python reference written from ALGORITHMS.md, token by token:
#   loss = sum_{i,t} w_{i,t} (L_pg + beta k - alpha H) + mu * sum_{i positive, t} (-logp) / N
# with the aggregation weight w of each real token
#   token-mean 1/N;  seq-mean-token-mean 1/(B n_i);  seq-mean-token-sum 1/B;  ...-norm 1/(B C)
# (N = real tokens, B = sequences, n_i = real tokens of sequence i, C = norm_const), so
#   d loss / d logp_t = w (dL_pg/dlogp + beta dk/dlogp) - mu [i positive] / N
#   d loss / d H_t    = -alpha w
# dL_pg/dlogp = -A rho where the unclipped term is the max, 0 where the clipped one is (rho is
# constant there); dk/dlogp: k1 1, k2 d, k3 1 - exp(-d).

ROWS = [  # per real token: (old_logp, log-ratio, advantage, ref_logp, entropy)
    [(-1.0, 0.1, 1.0, -1.2, 2.0),    # rho 1.105, inside the clip range
     (-0.5, 0.4, 1.0, -0.3, 1.5),    # rho 1.492 > 1.2 with A > 0: clipped, no pg gradient
     (-2.0, -0.1, 0.5, -2.5, 0.5)],
    [(-1.5, -0.5, -1.0, -1.0, 1.0),  # rho 0.607 < 0.8 with A < 0: clipped, no pg gradient
     (-0.7, 0.2, -2.0, -0.9, 0.8)],  # rho 1.221 > 1.2 with A < 0: unclipped term is the max
    [(-0.2, 0.05, 0.3, -0.4, 0.3)],
]
SCORES = [1.0, 0.5, 1.0]  # > 0.5 is positive: rows 0 and 2 (0.5 itself is not)
R_WIDTH = 3
PAD = 7.0  # finite garbage in padding: it must neither enter the value nor get a gradient
NORM_C = 4.0
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
BETA, ALPHA, MU = 0.3, 0.05, 0.2


def _policy_inputs(rows=ROWS, scores=SCORES):
    """(logp [B, R] leaf, entropy [B, R] leaf, Batch) from per-token tuples, padded with PAD."""
    def padded(col):
        return torch.tensor([[tok[col] for tok in row] + [PAD] * (R_WIDTH - len(row)) for row in rows])
    old = padded(0)
    logp = (old + padded(1)).detach().requires_grad_(True)
    entropy = padded(4).requires_grad_(True)
    mask = torch.tensor([[1] * len(row) + [0] * (R_WIDTH - len(row)) for row in rows])
    mb = Batch(old_logp=old, advantages=padded(2), ref_logp=padded(3), response_mask=mask,
               scores=torch.tensor(scores))
    return logp, entropy, mb


def _kl_and_slope(d: float, estimator: str) -> tuple[float, float]:
    """k(d) and dk/dd for d = logp - ref_logp within the k3 clamps."""
    if estimator == "k1":
        return d, 1.0
    if estimator == "k2":
        return d * d / 2, d
    return math.exp(-d) + d - 1, 1 - math.exp(-d)


def _weight(mode: str, n_i: int, n_tokens: int, n_seqs: int) -> float:
    return {"token-mean": 1 / n_tokens, "seq-mean-token-mean": 1 / (n_seqs * n_i),
            "seq-mean-token-sum": 1 / n_seqs, "seq-mean-token-sum-norm": 1 / (n_seqs * NORM_C)}[mode]


def _reference(mode, estimator, *, beta, alpha, mu, eps_low=0.2, eps_high=0.2, rows=ROWS, scores=SCORES):
    """Plain-Python value, d/dlogp and d/dH (lists of rows) and token-mean metrics."""
    n_tokens, n_seqs = sum(len(r) for r in rows), len(rows)
    value = pg = 0.0
    kl_sum = ent_sum = nll_sum = 0.0
    n_pos = 0
    d_logp, d_ent = [], []
    for row, score in zip(rows, scores):
        positive = score > 0.5
        w = _weight(mode, len(row), n_tokens, n_seqs)
        g_row, h_row = [], []
        for old, lr, adv, ref, ent in row:
            logp = old + lr
            rho = math.exp(lr)
            unclipped, clipped = -adv * rho, -adv * min(max(rho, 1 - eps_low), 1 + eps_high)
            assert abs(unclipped - clipped) > 1e-9 or 1 - eps_low < rho < 1 + eps_high  # no ties at a kink
            l_pg = max(unclipped, clipped)
            dl_pg = -adv * rho if unclipped >= clipped else 0.0
            k, dk = _kl_and_slope(logp - ref, estimator)
            pg += w * l_pg
            value += w * (l_pg + beta * k - alpha * ent)
            g = w * (dl_pg + beta * dk)
            if positive:
                value += mu * -logp / n_tokens
                g -= mu / n_tokens
                nll_sum += -logp
                n_pos += 1
            kl_sum += k
            ent_sum += ent
            g_row.append(g)
            h_row.append(-alpha * w)
        pad = R_WIDTH - len(row)
        d_logp.append(g_row + [0.0] * pad)
        d_ent.append(h_row + [0.0] * pad)
    metrics = {"pg_loss": pg, "kl_ref": kl_sum / n_tokens, "entropy": ent_sum / n_tokens,
               "positive_nll": nll_sum / n_tokens, "positive_frac": n_pos / n_tokens}
    return value, d_logp, d_ent, metrics


def _run_policy_loss(loss_fn, rows=ROWS, scores=SCORES):
    logp, entropy, mb = _policy_inputs(rows, scores)
    counts = GlobalCounts(tokens=float(sum(len(r) for r in rows)), seqs=float(len(rows)))
    loss, metrics = loss_fn(logp, entropy, mb, counts)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), metrics, g_logp, (torch.zeros_like(entropy) if g_ent is None else g_ent)


def _check(loss, metrics, g_logp, g_ent, ref):
    value, d_logp, d_ent, ref_metrics = ref
    assert float(loss) == pytest.approx(value, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_logp, torch.tensor(d_logp), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ent, torch.tensor(d_ent), rtol=1e-5, atol=1e-7)
    for key in ("pg_loss", "kl_ref", "entropy", "positive_nll", "positive_frac"):
        if key in metrics:
            assert float(metrics[key]) == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key


def test_policy_loss_reference_matches_a_hand_worked_token():
    """Pin the plain-Python reference itself on one token written out in full (token-mean of a
    single token, k3, every term on), so a slip in the reference cannot hide a slip in the code."""
    row = [[(-1.0, 0.1, 1.0, -1.2, 2.0)]]
    # logp = -0.9, rho = e^0.1 = 1.10517 (inside [0.8, 1.2]): L_pg = -1.10517
    # d = -0.9 - (-1.2) = 0.3: k3 = e^-0.3 + 0.3 - 1 = 0.040818, dk3 = 1 - e^-0.3 = 0.259182
    # loss = -1.10517 + 0.3 * 0.040818 - 0.05 * 2.0 + 0.2 * 0.9 = -1.012925
    # d/dlogp = -1.10517 + 0.3 * 0.259182 - 0.2 = -1.227416; d/dH = -0.05
    value, d_logp, d_ent, _ = _reference("token-mean", "k3", beta=BETA, alpha=ALPHA, mu=MU, rows=row,
                                         scores=[1.0])
    rho, e = math.exp(0.1), math.exp(-0.3)
    assert value == pytest.approx(-rho + 0.3 * (e - 0.7) - 0.1 + 0.18) == pytest.approx(-1.012925, abs=1e-6)
    assert d_logp[0][0] == pytest.approx(-rho + 0.3 * (1 - e) - 0.2) == pytest.approx(-1.227416, abs=1e-6)
    assert d_ent[0][0] == pytest.approx(-0.05)
    loss, metrics, g_logp, g_ent = _run_policy_loss(
        PolicyLoss(agg_mode="token-mean", kl_coef=BETA, kl_estimator="k3", entropy_coef=ALPHA, nll_coef=MU),
        rows=row, scores=[1.0])
    assert float(loss) == pytest.approx(-1.012925, abs=1e-6)
    assert float(g_logp[0, 0]) == pytest.approx(-1.227416, abs=1e-6)
    assert float(g_ent[0, 0]) == pytest.approx(-0.05)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_with_kl_entropy_and_nll_hand_computed(mode, estimator):
    """All three extra terms on at once: the value, every metric and d loss / d logp and
    d loss / d entropy per token (padding gets none) equal the formula's."""
    loss_fn = PolicyLoss(agg_mode=mode, norm_const=NORM_C, kl_coef=BETA, kl_estimator=estimator,
                         entropy_coef=ALPHA, nll_coef=MU)
    assert {"old_logp", "advantages", "ref_logp", "scores"} <= set(loss_fn.inputs())
    _check(*_run_policy_loss(loss_fn), _reference(mode, estimator, beta=BETA, alpha=ALPHA, mu=MU))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_term_alone_uses_the_configured_aggregation(mode, estimator):
    """Only the KL term added to PPO: loss - pg_loss = beta * agg_mode(k), and its gradient
    carries the mode's per-token weight (a KL term always token-mean fails this for every mode
    but token-mean)."""
    loss, metrics, g_logp, g_ent = _run_policy_loss(
        PolicyLoss(agg_mode=mode, norm_const=NORM_C, kl_coef=BETA, kl_estimator=estimator, log_entropy=False))
    ref = _reference(mode, estimator, beta=BETA, alpha=0.0, mu=0.0)
    _check(loss, metrics, g_logp, g_ent, ref)
    # the KL share, summed token by token with the mode's weights
    n_tokens, n_seqs = 6, 3
    kl_agg = sum(_weight(mode, len(row), n_tokens, n_seqs) * _kl_and_slope(old + lr - r, estimator)[0]
                 for row in ROWS for old, lr, _, r, _ in row)
    assert float(loss - metrics["pg_loss"]) == pytest.approx(BETA * kl_agg, rel=1e-5)
    assert "positive_nll" not in metrics and not g_ent.any()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_entropy_bonus_lowers_the_loss_and_raises_entropy(mode):
    """loss = pg - alpha agg(H): the bonus subtracts, so d loss / d H = -alpha w < 0 on every
    real token (descending the loss raises entropy); alpha 0 leaves the loss equal to pg and
    still logs the token-mean entropy."""
    loss, metrics, g_logp, g_ent = _run_policy_loss(PolicyLoss(agg_mode=mode, norm_const=NORM_C,
                                                               entropy_coef=ALPHA))
    _check(loss, metrics, g_logp, g_ent, _reference(mode, "k1", beta=0.0, alpha=ALPHA, mu=0.0))
    mask = _policy_inputs()[2].response_mask.bool()
    assert (g_ent[mask] < 0).all() and (g_ent[~mask] == 0).all()
    n_tokens, n_seqs = 6, 3
    h_agg = sum(_weight(mode, len(row), n_tokens, n_seqs) * tok[4] for row in ROWS for tok in row)
    assert float(metrics["pg_loss"] - loss) == pytest.approx(ALPHA * h_agg, rel=1e-5)
    off, off_metrics, _, off_g_ent = _run_policy_loss(PolicyLoss(agg_mode=mode, norm_const=NORM_C))
    assert float(off) == pytest.approx(float(off_metrics["pg_loss"]))
    assert float(off_metrics["entropy"]) == pytest.approx((2.0 + 1.5 + 0.5 + 1.0 + 0.8 + 0.3) / 6)
    assert not off_g_ent.any()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_positive_nll_term_is_token_mean_over_all_tokens_in_every_mode(mode):
    """loss += mu * sum over tokens of correct responses (-logp) / N, whatever agg_mode is; the
    gradient on each positive token gains -mu / N, on the others nothing."""
    loss, metrics, g_logp, g_ent = _run_policy_loss(PolicyLoss(agg_mode=mode, norm_const=NORM_C,
                                                               nll_coef=MU, log_entropy=False))
    _check(loss, metrics, g_logp, g_ent, _reference(mode, "k1", beta=0.0, alpha=0.0, mu=MU))
    # positive tokens: row 0 logp [-0.9, -0.1, -2.1], row 2 [-0.15]; N = 6
    assert float(metrics["positive_nll"]) == pytest.approx((0.9 + 0.1 + 2.1 + 0.15) / 6)
    assert float(metrics["positive_frac"]) == pytest.approx(4 / 6)
    assert float(loss - metrics["pg_loss"]) == pytest.approx(MU * 3.25 / 6, rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_with_every_term_is_invariant_to_micro_batching(mode):
    """Shares of micro-batches (one row each) with the step's counts add up to the full value
    and gradient, with KL, entropy and NLL on."""
    loss_fn = PolicyLoss(agg_mode=mode, norm_const=NORM_C, kl_coef=BETA, kl_estimator="k3",
                         entropy_coef=ALPHA, nll_coef=MU)
    logp, entropy, mb = _policy_inputs()
    counts = GlobalCounts(tokens=6.0, seqs=3.0)
    full, _ = loss_fn(logp, entropy, mb, counts)
    g_full = torch.autograd.grad(full, (logp, entropy))
    parts = sum(loss_fn(logp[i:i + 1], entropy[i:i + 1], mb.select([i]), counts)[0] for i in range(3))
    g_parts = torch.autograd.grad(parts, (logp, entropy))
    torch.testing.assert_close(parts, full)
    for a, b in zip(g_parts, g_full):
        torch.testing.assert_close(a, b)


def test_policy_loss_reads_loss_mask_over_response_mask():
    """A loss_mask that drops row 1 (e.g. overlong filtering): row 1 adds nothing and gets no
    gradient; the result is the reference over rows 0 and 2 with their counts."""
    loss_fn = PolicyLoss(agg_mode="seq-mean-token-mean", kl_coef=BETA, entropy_coef=ALPHA, nll_coef=MU)
    logp, entropy, mb = _policy_inputs()
    lm = mb.response_mask.clone()
    lm[1] = 0
    loss, metrics = loss_fn(logp, entropy, mb.with_fields(loss_mask=lm), GlobalCounts(tokens=4.0, seqs=2.0))
    g_logp, g_ent = torch.autograd.grad(loss, (logp, entropy))
    loss = loss.detach()
    value, d_logp, d_ent, _ = _reference("seq-mean-token-mean", "k3", beta=BETA, alpha=ALPHA, mu=MU,
                                         rows=[ROWS[0], ROWS[2]], scores=[SCORES[0], SCORES[2]])
    assert float(loss) == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(g_logp[[0, 2]], torch.tensor(d_logp))
    torch.testing.assert_close(g_ent[[0, 2]], torch.tensor(d_ent))
    assert not g_logp[1].any() and not g_ent[1].any()


# ---------------------------------------------------------------------------------------------
# KL in the reward: PPO's token_rewards (any estimator) and REINFORCE++'s k1 penalty.

KL_OLD = [[-1.0, -2.0, 5.0], [-0.5, 3.0, 3.0]]  # row 0 has 2 real tokens, row 1 has 1
KL_REF = [[-1.5, -1.0, -4.0], [-0.1, 0.0, 0.0]]
KL_MASK = [[1, 1, 0], [1, 0, 0]]


def _k(d: float, estimator: str) -> float:
    return _kl_and_slope(d, estimator)[0]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_ppo_token_rewards_subtract_each_kl_estimator_per_token(estimator):
    from algorithms.ppo import token_rewards
    coef = 0.1
    # d = old - ref: row 0 [0.5, -1.0] (padding 9 ignored), row 1 [-0.4]
    # reward r on the last real token: row 0 column 1 (r = 1), row 1 column 0 (r = -2)
    expect = [[-coef * _k(0.5, estimator), 1 - coef * _k(-1.0, estimator), 0.0],
              [-2 - coef * _k(-0.4, estimator), 0.0, 0.0]]
    got = token_rewards(torch.tensor([1.0, -2.0]), torch.tensor(KL_MASK), torch.tensor(KL_OLD),
                        torch.tensor(KL_REF), coef=coef, estimator=estimator)
    torch.testing.assert_close(got, torch.tensor(expect))
    # coef 0, or no reference inputs: the reward alone
    plain = torch.tensor([[0.0, 1.0, 0.0], [-2.0, 0.0, 0.0]])
    rewards, mask = torch.tensor([1.0, -2.0]), torch.tensor(KL_MASK)
    torch.testing.assert_close(token_rewards(rewards, mask, torch.tensor(KL_OLD), torch.tensor(KL_REF),
                                             coef=0.0, estimator=estimator), plain)
    torch.testing.assert_close(token_rewards(rewards, mask, coef=coef, estimator=estimator), plain)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_reinforce_pp_returns_with_each_kl_estimator(estimator):
    """The per-token reward with KL, then reverse cumsum and whitening, by hand; the k1 case
    also through REINFORCE++'s graph node, which computes k1 from (old_logp, ref_logp)."""
    from algorithms.advantages import reinforce_pp_advantages
    coef = 0.1
    ks = [[_k(0.5, estimator), _k(-1.0, estimator)], [_k(-0.4, estimator)]]
    rewards = [1.0, -2.0]
    returns = [[rewards[0] - coef * (ks[0][0] + ks[0][1]), rewards[0] - coef * ks[0][1]],
               [rewards[1] - coef * ks[1][0]]]
    flat = [x for row in returns for x in row]
    mean = sum(flat) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 3)
    adv = [[(x - mean) / (std + 1e-8) for x in row] for row in returns]
    kl_BR = kl_penalty(torch.tensor(KL_OLD), torch.tensor(KL_REF), estimator)
    got_adv, got_ret = reinforce_pp_advantages(torch.tensor(rewards), torch.tensor(KL_MASK), kl_BR=kl_BR,
                                               kl_coef=coef)
    torch.testing.assert_close(got_ret, torch.tensor([returns[0] + [0.0], returns[1] + [0.0, 0.0]]))
    torch.testing.assert_close(got_adv, torch.tensor([adv[0] + [0.0], adv[1] + [0.0, 0.0]]))
    if estimator == "k1":
        from algorithms.reinforce_pp import advantages as rpp_node
        node_adv = rpp_node(torch.tensor(rewards), torch.tensor(KL_MASK), torch.zeros(2), torch.tensor(KL_OLD),
                            torch.tensor(KL_REF), kl_coef=coef, baseline=False)
        torch.testing.assert_close(node_adv, got_adv)
