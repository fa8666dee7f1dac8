"""The policy objectives (loss.objective) against plain-Python references written from their
papers' formulas, token by token: values and per-token gradients under the four aggregation
modes; hand-worked single cases where the stop-gradient placement is the point (CISPO,
GSPO-token); exact under micro-batching; Clip-Cov/KL-Cov selection; on-policy distillation's
advantage and the teacher option of the reference role."""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from algorithms.base import ALGORITHMS
from algorithms.cispo import CISPO
from algorithms.cov import ClipCov, KLCov, cov_select, step_seed
from algorithms.gmpo import GMPO
from algorithms.gspo import GSPO, GSPOToken
from algorithms.losses import (
    OBJECTIVES,
    AggMode,
    PolicyLoss,
    PolicyObjective,
    PPOClip,
    kl_penalty,
    ppo_clip_loss,
)
from algorithms.opd import opd_advantages
from algorithms.sapo import SAPO
from core.batch import Batch, GlobalCounts
from core.config import load_config
from core.models import ModelConfig, build_model
from launch.config import JobConfig
from roles.reference import Reference
from tests.dist_utils import run_distributed
from tests.helpers import random_batch, tiny_model_config
from tests.test_actor_dist import _actor, _full_grads, _my_shard

# Four sequences of (old logp, log-ratio l = logp - old, advantage) per token; the ratios are
# chosen to fall inside and outside each objective's range, on both sides, away from the kinks.
ROWS = [
    [(-1.0, 0.10, 1.0), (-2.0, -0.30, 1.0), (-0.5, 0.25, 1.0)],
    [(-1.5, -0.05, -0.5), (-0.7, 0.40, -0.5)],
    [(-0.2, 0.02, 0.7), (-3.0, -0.60, -0.2), (-1.1, 0.00, 1.3), (-0.9, 0.30, 0.4)],
    [(-2.5, -0.15, -1.2)],
]
SELECTED = {(0, 0), (2, 3)}
"""Tokens the Clip-Cov / KL-Cov tests mark in cov_mask."""
NORM_C = 5.0
MODES: list[AggMode] = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def clip(x: float, lo: float | None, hi: float | None) -> float:
    x = max(x, lo) if lo is not None else x
    return min(x, hi) if hi is not None else x


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Each reference takes one sequence [(old, l, A)] and returns (L_t, dL_t/dlogp_u) per token.
Ref = Callable[[list[tuple[float, float, float]], int], tuple[list[float], list[list[float]]]]


def ref_ppo(eps_low: float, eps_high: float) -> Ref:
    def f(seq, i):
        n = len(seq)
        L, d = [], [[0.0] * n for _ in range(n)]
        for t, (_, lr, a) in enumerate(seq):
            r = math.exp(lr)
            unclipped, clipped = -a * r, -a * clip(r, 1 - eps_low, 1 + eps_high)
            assert abs(unclipped - clipped) > 1e-6 or 1 - eps_low < r < 1 + eps_high  # no kink
            L.append(max(unclipped, clipped))
            d[t][t] = -a * r if unclipped >= clipped else 0.0
        return L, d
    return f


def ref_gspo(eps_low: float, eps_high: float, *, token: bool) -> Ref:
    def f(seq, i):
        n = len(seq)
        s = math.exp(sum(lr for _, lr, _ in seq) / n)
        L, d = [], [[0.0] * n for _ in range(n)]
        for t, (_, _, a) in enumerate(seq):
            unclipped, clipped = -a * s, -a * clip(s, 1 - eps_low, 1 + eps_high)
            L.append(max(unclipped, clipped))
            if unclipped >= clipped:
                if token:  # s_{i,t} = sg[s_i] pi_t / sg[pi_t]: only token t's own log-prob
                    d[t][t] = -a * s
                else:      # s_i = exp(mean_u l_u): every token u of the sequence, ds/dl_u = s / n
                    for u in range(n):
                        d[t][u] = -a * s / n
        return L, d
    return f


def ref_cispo(eps_low: float | None, eps_high: float) -> Ref:
    def f(seq, i):
        n = len(seq)
        L, d = [], [[0.0] * n for _ in range(n)]
        for t, (_, lr, a) in enumerate(seq):
            w = clip(math.exp(lr), None if eps_low is None else 1 - eps_low, 1 + eps_high)
            L.append(-w * a)
            d[t][t] = -w * a  # the weight is detached: gradient -w A through log pi, clipped or not
        return L, d
    return f


def ref_sapo(tau_pos: float, tau_neg: float) -> Ref:
    def f(seq, i):
        n = len(seq)
        L, d = [], [[0.0] * n for _ in range(n)]
        for t, (_, lr, a) in enumerate(seq):
            r, tau = math.exp(lr), tau_pos if a > 0 else tau_neg
            g = sigmoid(tau * (r - 1))
            L.append(-g * 4 / tau * a)
            d[t][t] = -4 * g * (1 - g) * r * a  # d/dlogp [sigmoid(tau(r-1)) 4/tau] = 4 g (1-g) r
        return L, d
    return f


def ref_gmpo(eps_low: float, eps_high: float) -> Ref:
    def f(seq, i):
        n = len(seq)
        a_seq = sum(a for _, _, a in seq) / n
        sgn = (a_seq > 0) - (a_seq < 0)
        kept, free = [], []
        for _, lr, _ in seq:
            c = clip(lr, -eps_low, eps_high)
            kept.append(sgn * min(sgn * lr, sgn * c))
            free.append(sgn * lr <= sgn * c)  # the token's own ratio is used (gradient flows)
        G = math.exp(sum(kept) / n)
        L = [-a_seq * G] * n
        d = [[(-a_seq * G / n if free[u] else 0.0) for u in range(n)] for _ in range(n)]
        return L, d
    return f


def ref_clip_cov(eps_low: float, eps_high: float) -> Ref:
    ppo = ref_ppo(eps_low, eps_high)

    def f(seq, i):
        L, d = ppo(seq, i)
        for t in range(len(seq)):
            if (i, t) in SELECTED:
                L[t], d[t] = 0.0, [0.0] * len(seq)
        return L, d
    return f


def ref_kl_cov(beta: float) -> Ref:
    def f(seq, i):
        n = len(seq)
        L, d = [], [[0.0] * n for _ in range(n)]
        for t, (_, lr, a) in enumerate(seq):
            r, sel = math.exp(lr), (i, t) in SELECTED
            L.append(-a * r + (beta * abs(lr) if sel else 0.0))
            d[t][t] = -a * r + (beta * math.copysign(1.0, lr) if sel else 0.0)
        return L, d
    return f


CASES: dict[str, tuple[PolicyObjective, Ref, dict]] = {
    "ppo_clip": (PPOClip(), ref_ppo(0.2, 0.28), {"eps_high": 0.28}),
    "gspo": (GSPO(eps_low=0.05, eps_high=0.1), ref_gspo(0.05, 0.1, token=False), {}),
    "gspo_token": (GSPOToken(eps_low=0.05, eps_high=0.1), ref_gspo(0.05, 0.1, token=True), {}),
    "cispo": (CISPO(), ref_cispo(None, 0.2), {}),
    "cispo_floor": (CISPO(eps_low=0.3, eps_high=0.2), ref_cispo(0.3, 0.2), {}),
    "sapo": (SAPO(), ref_sapo(1.0, 1.05), {}),
    "gmpo": (GMPO(eps_low=0.2, eps_high=0.2), ref_gmpo(0.2, 0.2), {}),
    "clip_cov": (ClipCov(), ref_clip_cov(0.2, 0.28), {"eps_high": 0.28}),
    "kl_cov": (KLCov(kl_coef=0.5), ref_kl_cov(0.5), {}),
}


def reference(ref: Ref, mode: str, rows=ROWS) -> tuple[float, list[list[float]]]:
    """sum_{i,t} w_{i,t} L_{i,t} and its gradient in each log-prob, w the aggregation weight."""
    n_tok, n_seq = sum(len(r) for r in rows), len(rows)
    value, grads = 0.0, []
    for i, seq in enumerate(rows):
        L, d = ref(seq, i)
        w = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (n_seq * len(seq)),
             "seq-mean-token-sum": 1 / n_seq, "seq-mean-token-sum-norm": 1 / (n_seq * NORM_C)}[mode]
        value += w * sum(L)
        grads.append([w * sum(d[t][u] for t in range(len(seq))) for u in range(len(seq))])
    return value, grads


def inputs(rows=ROWS, offset: int = 0) -> tuple[torch.Tensor, Batch]:
    """(logp [B, R] leaf with grad, the micro-batch) from rows (the batch's rows from `offset`
    on), padded with NaN old log-probs."""
    B, R = len(rows), max(len(r) for r in rows)
    old = torch.full((B, R), float("nan"))
    logp, adv, mask = torch.zeros(B, R), torch.zeros(B, R), torch.zeros(B, R, dtype=torch.long)
    cov = torch.zeros(B, R)
    for i, seq in enumerate(rows):
        for t, (o, lr, a) in enumerate(seq):
            old[i, t], logp[i, t], adv[i, t], mask[i, t] = o, o + lr, a, 1
            cov[i, t] = float((offset + i, t) in SELECTED)
    logp.requires_grad_(True)
    return logp, Batch(old_logp=old, advantages=adv, response_mask=mask, cov_mask=cov)


def run(loss_fn: PolicyLoss, rows=ROWS, counts: GlobalCounts | None = None, offset: int = 0):
    logp, mb = inputs(rows, offset)
    counts = counts or GlobalCounts(tokens=float(sum(len(r) for r in rows)), seqs=float(len(rows)))
    loss, metrics = loss_fn(logp, None, mb, counts)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), metrics, grad


def policy_loss(name: str, mode: AggMode) -> PolicyLoss:
    objective, _, extra = CASES[name]
    return PolicyLoss(agg_mode=mode, norm_const=NORM_C, objective=objective, log_entropy=False, **extra)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_objective_value_and_per_token_gradient_match_the_reference(name, mode):
    loss, metrics, grad = run(policy_loss(name, mode))
    value, grads = reference(CASES[name][1], mode)
    assert float(loss) == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert float(metrics["pg_loss"]) == pytest.approx(value, rel=1e-5, abs=1e-7)
    want = torch.zeros_like(grad)
    for i, g in enumerate(grads):
        want[i, :len(g)] = torch.tensor(g)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(grad).all()  # the NaN old log-probs in the padding never leak


def test_the_references_have_both_clipped_and_free_tokens():
    """Each case's inputs reach both sides of its objective (else a clip could be wrong unseen)."""
    for name in ("ppo_clip", "gspo", "gspo_token", "gmpo"):
        _, metrics, grad = run(policy_loss(name, "token-mean"))
        assert 0 < float(metrics["pg_clipfrac"]) < 1, name
        assert (grad == 0).any() and (grad != 0).any(), name
    _, metrics, grad = run(policy_loss("cispo", "token-mean"))
    assert float(metrics["pg_clipfrac"]) == pytest.approx(3 / 10)  # e^.25, e^.4, e^.3 capped at 1.2
    assert (grad[inputs()[1].response_mask.bool()] != 0).all()     # yet every token has a gradient


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_shares_add_up_to_the_full_loss(name, mode):
    """Shares of two micro-batches, with the step's global counts, equal the full value and
    gradient (the loss-scaling contract of core/optim.py), sequence-level objectives included."""
    counts = GlobalCounts(tokens=10.0, seqs=4.0)
    full, _, grad = run(policy_loss(name, mode), counts=counts)
    got, total = torch.zeros_like(grad), 0.0
    for a, b in ((0, 1), (1, 4)):
        part, _, g = run(policy_loss(name, mode), rows=ROWS[a:b], counts=counts, offset=a)
        total += float(part)
        got[a:b, :g.shape[1]] = g
    assert total == pytest.approx(float(full), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-7)


def test_cispo_keeps_the_gradient_of_a_clipped_token_and_ppo_does_not():
    """One token, A = +1, ratio e^0.4 = 1.4918 above CISPO's cap 1.2 and PPO's 1.2:
    CISPO: value -1.2, d/dlogp = -1.2 (the clipped weight, detached, times d log pi);
    PPO:   value -1.2, d/dlogp = 0 (the clipped branch is constant)."""
    row = [[(-1.0, 0.4, 1.0)]]
    loss, metrics, grad = run(PolicyLoss(objective=CISPO(eps_high=0.2), log_entropy=False), rows=row)
    assert float(loss) == pytest.approx(-1.2) and float(grad[0, 0]) == pytest.approx(-1.2)
    assert float(metrics["pg_clipfrac"]) == 1.0
    loss, _, grad = run(PolicyLoss(eps_high=0.2, log_entropy=False), rows=row)
    assert float(loss) == pytest.approx(-1.2) and float(grad[0, 0]) == 0.0
    # inside the cap the weight is the ratio itself: A = -2, ratio e^-0.1 = 0.904837:
    # value 2 * 0.904837 = 1.809675, gradient the same (r A d log pi, r not differentiated)
    loss, _, grad = run(PolicyLoss(objective=CISPO(), log_entropy=False), rows=[[(-1.0, -0.1, -2.0)]])
    assert float(loss) == pytest.approx(2 * math.exp(-0.1)) and float(grad[0, 0]) == pytest.approx(2 * math.exp(-0.1))


def test_gspo_token_gives_each_token_its_own_advantage_gspo_the_sequence_mean():
    """Two tokens, l = (0.1, -0.1) so s = 1 exactly, advantages (1, -3), wide range (no clip),
    seq-mean-token-mean over one sequence: value (1/2)(-1 + 3) = 1 for both.
    GSPO: d/dlogp_u = (1/2) sum_t (-A_t) s / 2 = (1/2)(2)/2 = 0.5 for both tokens.
    GSPO-token: d/dlogp_t = (1/2)(-A_t s) = (-0.5, 1.5)."""
    row = [[(-1.0, 0.1, 1.0), (-2.0, -0.1, -3.0)]]
    for objective, want in ((GSPO(eps_low=0.5, eps_high=0.5), [0.5, 0.5]),
                            (GSPOToken(eps_low=0.5, eps_high=0.5), [-0.5, 1.5])):
        loss, _, grad = run(PolicyLoss(agg_mode="seq-mean-token-mean", objective=objective, log_entropy=False),
                            rows=row)
        assert float(loss) == pytest.approx(1.0)
        torch.testing.assert_close(grad[0], torch.tensor(want))
    # A clipped sequence: s = e^0.1 = 1.105 > 1 + 4e-4 with A > 0: no gradient to any token.
    _, metrics, grad = run(PolicyLoss(objective=GSPOToken(), log_entropy=False),
                           rows=[[(-1.0, 0.1, 1.0), (-1.0, 0.1, 1.0)]])
    assert (grad == 0).all() and float(metrics["pg_clipfrac"]) == 1.0


def test_sapo_gate_is_the_policy_gradient_on_policy():
    """At ratio 1 the gate is 2/tau and its gradient weight 4 * 1/2 * 1/2 * 1 = 1: SAPO's
    gradient equals the plain policy gradient -A, whatever tau."""
    loss, metrics, grad = run(PolicyLoss(objective=SAPO(tau_pos=3.0, tau_neg=0.5), log_entropy=False),
                              rows=[[(-1.0, 0.0, 2.0), (-1.0, 0.0, -1.0)]])
    torch.testing.assert_close(grad[0], torch.tensor([-2.0, 1.0]) / 2)
    assert float(loss) == pytest.approx((-2 * 2 / 3 + 1 * 2 / 0.5) / 2)
    assert float(metrics["pg_gate_weight"]) == pytest.approx(1.0)


def test_default_objective_is_ppo_clip_unchanged():
    """PolicyLoss() is ppo_clip_loss with the loss's own range, bit for bit, and reports verl's
    metric names: pg_clipfrac (either side), pg_clipfrac_lower only with the dual clip."""
    logp, mb = inputs()
    counts = GlobalCounts(tokens=10.0, seqs=4.0)
    loss, metrics = PolicyLoss(eps_high=0.28, dual_clip=3.0, log_entropy=False)(logp, None, mb, counts)
    pg, flags = ppo_clip_loss(logp, mb.old_logp, mb.advantages, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    m = mb.response_mask.bool()
    assert torch.equal(loss, torch.where(m, pg, 0.0).sum() / 10.0)
    upper, lower = flags["pg_clipfrac_upper"] & m, flags["pg_clipfrac_lower"] & m
    assert float(metrics["pg_clipfrac"]) == pytest.approx(float((upper | lower).sum()) / 10)
    # above 1.28 with A > 0: rows (0, 2) and (2, 3); below 0.8 with A < 0: row (2, 1)
    assert float(metrics["pg_clipfrac_ratio_high"]) == pytest.approx(float(upper.sum()) / 10) == pytest.approx(0.2)
    assert float(metrics["pg_clipfrac_ratio_low"]) == pytest.approx(float(lower.sum()) / 10) == pytest.approx(0.1)
    assert "pg_clipfrac_lower" in metrics and "pg_clipfrac_upper" not in metrics
    assert "pg_clipfrac_lower" not in PolicyLoss(log_entropy=False)(logp, None, mb, counts)[1]


def test_abs_kl_estimator():
    torch.testing.assert_close(kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), "abs"),
                               torch.tensor([0.5, 1.0]))


def test_objective_slot_loads_by_name_with_its_own_defaults():
    cfg = load_config(JobConfig, None, ["algorithm.loss.objective=gspo"])
    assert isinstance(cfg.algorithm.loss.objective, GSPO) and cfg.algorithm.loss.objective.eps_high == 4e-4
    cfg = load_config(JobConfig, None, ["algorithm.name=dapo", "algorithm.loss.objective.name=cispo",
                                        "algorithm.loss.objective.eps_high=0.5"])
    assert cfg.algorithm.loss.eps_high == 0.28 and cfg.algorithm.loss.objective == CISPO(eps_high=0.5)
    with pytest.raises(ValueError, match="valid names: .*gspo"):
        load_config(JobConfig, None, ["algorithm.loss.objective=gpso"])
    with pytest.raises(ValueError, match="dual_clip"):
        load_config(JobConfig, None, ["algorithm.loss.objective=sapo", "algorithm.loss.dual_clip=3.0"])
    assert set(OBJECTIVES.names()) == {"ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov"}


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov"])
def test_each_objective_is_a_registered_grpo_preset(name):
    cfg = load_config(JobConfig, None, [f"algorithm.name={name}"])
    assert cfg.algorithm.loss.objective.name == name and cfg.algorithm.loss.kl_coef == 0.0
    graph = ALGORITHMS.get(name).build(cfg.algorithm)
    update = next(n for n in graph.nodes if n.name == "update_actor")
    assert update.kwargs["loss_fn"].objective.name == name
    assert ("cov_select" in {n.name for n in graph.nodes}) == name.endswith("_cov")


# ---- Clip-Cov / KL-Cov token selection ------------------------------------------------------

def test_covariance_selection_hand_computed():
    """4 tokens: logp (-1, -2, -3, -2), A (1, 1, -1, -1) -> means -2 and 0;
    Cov = (1*1, 0*1, -1*-1, 0*-1) = (1, 0, 1, 0) with one masked token that must not count."""
    old = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, -2.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    ids = torch.tensor([[3, 4, 0], [5, 6, 0]])
    top = cov_select(old, adv, mask, ids, rule="top", frac=0.5).value   # k = int(0.5 * 4) = 2
    assert top.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]           # the two Cov = 1, ties stable
    one = cov_select(old, adv, mask, ids, rule="top", frac=1e-4).value  # at least one token
    assert one.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # Clip-Cov: candidates need 0.5 < Cov < 5, i.e. the two Cov = 1 tokens; pick 1 at random
    picks = {tuple(cov_select(old, adv, mask, ids, rule="clip", frac=0.25, low=0.5, high=5.0, seed=s)
                   .value.nonzero()[0].tolist()) for s in range(20)}
    assert picks == {(0, 0), (1, 0)}
    assert cov_select(old, adv, mask, ids, rule="clip", frac=1.0, low=1.0, high=5.0).value.sum() == 0  # strict
    a = cov_select(old, adv, mask, ids, rule="clip", frac=0.25, low=0.5, high=5.0, seed=3).value
    assert torch.equal(a, cov_select(old, adv, mask, ids, rule="clip", frac=0.25, low=0.5, high=5.0, seed=3).value)
    assert step_seed(3, ids, mask) != step_seed(3, ids + 1, mask)


# ---- on-policy distillation -----------------------------------------------------------------

def test_opd_advantage_is_the_negative_reverse_kl_per_token_plus_the_reward_term():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    teacher = torch.tensor([[-0.5, -2.5], [-0.5, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards, groups = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    out = opd_advantages(rewards, groups, mask, old, teacher, distill_coef=2.0, reward_coef=0.0, norm_std=True)
    # -2 * (old - teacher) = -2 * (-0.5, 0.5, 0, pad)
    torch.testing.assert_close(out.value, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert out.metrics["opd/reverse_kl"] == pytest.approx((-0.5 + 0.5 + 0.0) / 3)
    mixed = opd_advantages(rewards, groups, mask, old, teacher, distill_coef=2.0, reward_coef=0.5, norm_std=True)
    # GRPO: mean 0.5, unbiased std sqrt(0.5): A = +-0.5 / (0.70711 + 1e-6)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(mixed.value, torch.tensor([[1.0 + 0.5 * a, -1.0 + 0.5 * a], [-0.5 * a, 0.0]]))


def test_reference_serves_a_teacher_folder_only_when_built_from_it():
    folder = "assets/quickstart-sft"
    cfg = Reference.Config(model_path=folder)
    assert cfg.source(ModelConfig(path="other")).path == folder
    assert Reference.Config().source(ModelConfig(path="other")).path == "other"
    Reference(cfg, build_model(ModelConfig(path=folder)))
    with pytest.raises(ValueError, match="must build it from Reference.Config.source"):
        Reference(cfg, build_model(tiny_model_config(), seed=0))
    with pytest.raises(ValueError, match="anchor=fixed"):
        Reference.Config(model_path=folder, anchor="ema")


# ---- every objective under the loss-scaling contract, on 2 gloo ranks ------------------------

DIST_OBJECTIVES: dict[str, PolicyObjective] = {
    "ppo_clip": PPOClip(), "gspo": GSPO(), "gspo_token": GSPOToken(), "cispo": CISPO(), "sapo": SAPO(),
    "gmpo": GMPO(), "clip_cov": ClipCov(frac=0.1, cov_low=0.05), "kl_cov": KLCov(frac=0.1),
}


def objective_grads(micro_batch_size: int) -> dict:
    """Loss, metrics and full gradient of one optimizer step for every objective and mode, on
    this rank's half of the same 8 samples (Clip-Cov/KL-Cov select over both halves)."""
    actor = _actor(micro_batch_size)
    batch = random_batch(0, B=8)
    old = actor.log_probs(batch)
    noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    batch = _my_shard(batch.with_fields(old_logp=old + 0.05 * noise))
    out = {}
    for name, objective in DIST_OBJECTIVES.items():
        mb = batch
        for node in objective.nodes("response_mask"):
            assert not isinstance(node.op, str)
            mb = mb.with_fields(cov_mask=node.op(*(mb[f] for f in node.inputs), **node.kwargs).value)
        for mode in MODES:
            loss_fn = PolicyLoss(agg_mode=mode, norm_const=5.0, objective=objective)
            metrics = actor.accumulate(mb, loss_fn)
            out[name, mode] = {"metrics": metrics, "grads": _full_grads(actor.model)}
            actor.optimizer.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def dist_runs():
    return {"single": run_distributed(objective_grads, 8, world_size=1)[0],
            "micro": run_distributed(objective_grads, 2, world_size=1)[0],
            "two": run_distributed(objective_grads, 2, world_size=2)}


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(DIST_OBJECTIVES))
def test_objective_is_exact_under_micro_batching_and_two_ranks(dist_runs, name, mode):
    """1 process x 1 micro-batch, 1 process x 4 micro-batches, 2 ranks x 2 micro-batches: the
    same loss, metrics and gradient for every objective and aggregation mode."""
    single = dist_runs["single"][name, mode]
    assert any(float(g.abs().max()) > 0 for g in single["grads"].values())  # the step has a gradient
    for other in (dist_runs["micro"][name, mode], dist_runs["two"][0][name, mode], dist_runs["two"][1][name, mode]):
        for key, want in single["metrics"].items():
            assert other["metrics"][key] == pytest.approx(want, rel=1e-5, abs=1e-7), key
        for pname, g in single["grads"].items():
            torch.testing.assert_close(other["grads"][pname], g, rtol=1e-4, atol=1e-6, msg=pname)
    if name.endswith("_cov"):
        assert single["metrics"]["cov_frac"] > 0
