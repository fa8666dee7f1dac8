"""Reward shaping, value loss, positive NLL, chunked entropy, the reference anchor and VAPO's
stop rule, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

import core.models as models
from algorithms.losses import ValueLoss, positive_nll
from algorithms.shaping import RewardShaping, overlong_punishment, shape_rewards
from algorithms.vapo import settled
from core.batch import Batch, GlobalCounts
from tests.dist_utils import run_distributed
from tests.helpers import random_batch, tiny_model_config


def test_overlong_punishment_three_regimes():
    # L_max = 20, L_cache = 5: no penalty up to 15, linear to -1 at 20, -1 beyond.
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    got = overlong_punishment(lengths, max_len=20, buffer=5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0], dtype=torch.float64))
    assert overlong_punishment(lengths, max_len=20, buffer=0).abs().sum() == 0


TEXTS = ["a", "b", "c", "d"]
BUDGET_10 = torch.full((4,), 10)


def test_shaping_follows_each_samples_own_budget():
    """A length curriculum changes the budget between steps: each sample is shaped against
    the budget it was generated with. Lengths 9 of budget 10 (buffer 2) and of budget 20
    (buffer 4: 9 <= 16, no penalty); exploration 0.1 * 9/10 and 0.1 * 9/20."""
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[:, :9] = 1
    out = shape_rewards(torch.ones(2), mask, ["stop", "stop"], ["a", "b"], torch.tensor([10, 20]),
                        cfg=RewardShaping(overlong_buffer_frac=0.2, exploration_coef=0.1))
    torch.testing.assert_close(out.value, torch.tensor([1.0 - 0.5 + 0.09, 1.0 + 0.045]))


def test_shape_rewards_dapo_and_orz():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.zeros(4, 10, dtype=torch.long)
    for i, n in enumerate([4, 9, 10, 10]):
        mask[i, :n] = 1
    finish = ["stop", "stop", "stop", "length"]
    dapo = shape_rewards(scores, mask, finish, TEXTS, BUDGET_10,
                         cfg=RewardShaping(correct=1, wrong=-1, overlong_buffer_frac=0.2))
    # buffer = 2 tokens: len 4 -> 0, len 9 -> (8 - 9) / 2 = -0.5, len 10 -> -1
    torch.testing.assert_close(dapo.value, torch.tensor([1.0, -1.5, 0.0, 0.0]))
    assert dapo.metrics["reward/correctness"] == 0.75
    assert dapo.metrics["reward/overlong"] == pytest.approx((0 - 0.5 - 1 - 1) / 4)
    orz = shape_rewards(scores, mask, finish, TEXTS, BUDGET_10, cfg=RewardShaping(truncated=0.0))
    torch.testing.assert_close(orz.value, torch.tensor([1.0, 0.0, 1.0, 0.0]))  # cut -> 0 even if right
    rlsp = shape_rewards(scores, mask, finish, TEXTS, BUDGET_10, cfg=RewardShaping(exploration_coef=0.1))
    torch.testing.assert_close(rlsp.value, torch.tensor([1.04, 0.09, 1.1, 1.1]))
    assert rlsp.metrics["reward/exploration"] == pytest.approx(0.1 * 33 / 40)


def test_format_term():
    cfg = RewardShaping(format_regex=r"<think>.*</think>\s*<answer>.*</answer>", format_bonus=0.1,
                        format_penalty=-0.5)
    texts = ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>", "", "<think>x</think><answer>y</answer>"]
    out = shape_rewards(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.ones(4, 3), ["stop"] * 4, texts, torch.full((4,), 3), cfg=cfg)
    torch.testing.assert_close(out.value, torch.tensor([1.1, 0.5, -0.5, 0.1]))
    assert out.metrics["reward/format"] == pytest.approx((0.1 - 0.5 - 0.5 + 0.1) / 4)


def test_value_loss_hand_computed():
    # V_old = 1, returns 2; new V = 1.5 (inside clip 0.2 -> clipped V = 1.2) and 0.5
    mb = Batch(response_mask=torch.tensor([[1, 1]]), values=torch.tensor([[1.0, 1.0]]),
               returns=torch.tensor([[2.0, 2.0]]))
    v = torch.tensor([[1.5, 0.5]])
    loss, m = ValueLoss(clip=0.2)(v, mb, GlobalCounts(tokens=2, seqs=1))
    # token 1: max((1.5-2)^2, (1.2-2)^2) = 0.64 ; token 2: max((0.5-2)^2, (0.8-2)^2) = 2.25
    assert float(loss) == pytest.approx(0.5 * (0.64 + 2.25) / 2)
    assert float(m["vf_clipfrac"]) == 0.5
    loss_nc, _ = ValueLoss(clip=None)(v, mb, GlobalCounts(tokens=2, seqs=1))
    assert float(loss_nc) == pytest.approx(0.5 * (0.25 + 2.25) / 2)


def test_positive_nll_only_counts_correct_responses():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    nll, share = positive_nll(logp, mask, torch.tensor([1.0, 0.0]), GlobalCounts(tokens=3, seqs=2))
    assert float(nll) == pytest.approx((1 + 2) / 3) and float(share) == pytest.approx(2 / 3)


def test_chunked_logprobs_and_entropy_match_direct_computation(monkeypatch):
    model = models.build_model(tiny_model_config(), seed=0)
    batch = random_batch(0, B=4)
    ids, mask, pos = models.model_inputs(batch)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    R = batch.response_ids.shape[1]
    z = logits[:, -R - 1:-1].float() / 0.7
    logp_ref = z.log_softmax(-1).gather(-1, batch.response_ids[..., None])[..., 0] * batch.response_mask
    ent_ref = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1) * batch.response_mask
    monkeypatch.setattr(models, "LOGIT_CHUNK_TOKENS", 3)  # several chunks, one partial
    logp, ent = models.token_logprobs(model, batch, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(logp, logp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    (g_chunk,) = torch.autograd.grad((logp.sum() + ent.sum()), model.lm_head.weight)
    (g_ref,) = torch.autograd.grad((logp_ref.sum() + ent_ref.sum()), model.lm_head.weight)
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-4, atol=1e-6)


def anchor_runs() -> dict[str, list[float]]:
    return {mode: anchor_run(mode) for mode in ("fixed", "reset", "ema")}


def anchor_run(mode: str) -> list[float]:
    """Max |ref - actor| over parameters after each of 3 steps under the anchor rule."""
    from core import dist
    from core.models import build_model, shard_model
    from roles.actor import Actor
    from roles.reference import Reference
    actor = Actor(Actor.Config(lr=1e-2), shard_model(build_model(tiny_model_config(), seed=0), dist.mesh()),
                  total_steps=3)
    ref = Reference(Reference.Config(anchor=mode, anchor_every=2, ema_decay=0.5),
                    shard_model(build_model(tiny_model_config(), seed=0), dist.mesh()))
    out = []
    for _ in range(3):
        for p in actor.model.parameters():  # a deterministic "update" of the actor
            p.data.add_(0.1)
        ref.follow(actor)
        out.append(max(float((a.full_tensor() - r.full_tensor()).abs().max())
                       for a, r in zip(actor.model.parameters(), ref.model.parameters())))
    return out


@pytest.mark.dist
def test_reference_anchor_reset_and_ema_on_two_ranks():
    runs = run_distributed(anchor_runs, world_size=2)[0]
    fixed, reset, ema = runs["fixed"], runs["reset"], runs["ema"]
    assert fixed == pytest.approx([0.1, 0.2, 0.3], rel=1e-4)
    assert reset == pytest.approx([0.1, 0.0, 0.1], abs=1e-5)    # reset every 2 steps
    # ema 0.5: gap g -> 0.5 * (g + 0.1): 0.05, 0.075, 0.0875
    assert ema == pytest.approx([0.05, 0.075, 0.0875], rel=1e-4)


def test_value_pretraining_stop_rule():
    flat = [{"critic/vf_loss": v} for v in [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5]]
    assert not settled(flat[:3], key="critic/vf_loss", window=2, tol=0.05)
    assert not settled(flat[:4], key="critic/vf_loss", window=2, tol=0.05)  # 0.9 -> 0.55
    assert settled(flat, key="critic/vf_loss", window=2, tol=0.05)           # 0.5 -> 0.5


def test_kl_in_reward_token_rewards_hand_computed():
    from algorithms.ppo import token_rewards
    # r = 1 on the last real token (index 1 of row 0); k1 = old - ref = [0.5, -0.25, 9]
    mask = torch.tensor([[1, 1, 0]])
    got = token_rewards(torch.tensor([1.0]), mask, torch.tensor([[-1.0, -2.0, 5.0]]),
                        torch.tensor([[-1.5, -1.75, -4.0]]), coef=0.1, estimator="k1")
    torch.testing.assert_close(got, torch.tensor([[-0.05, 1.025, 0.0]]))


class _NaNLoss:
    needs_entropy = False

    def __call__(self, logp_BR, entropy_BR, mb, counts):
        return logp_BR.sum() * float("nan"), {}


def guard_run() -> dict:
    from core import dist
    from core.models import build_model, shard_model
    from core.optim import NonFiniteError
    from roles.actor import Actor
    actor = Actor(Actor.Config(lr=1e-2, max_bad_steps=3), shard_model(build_model(tiny_model_config(), seed=0),
                                                                  dist.mesh()), total_steps=5)
    before = [p.full_tensor().clone() for p in actor.model.parameters()]
    batch = random_batch(0, B=4)
    skipped = []
    try:
        for _ in range(5):
            skipped.append(actor.update(batch, loss_fn=_NaNLoss()).metrics["actor/skipped_steps"])
        error = ""
    except NonFiniteError as e:
        error = str(e)
    unchanged = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, actor.model.parameters()))
    return {"skipped": skipped, "error": error, "unchanged": unchanged}


@pytest.mark.dist
def test_non_finite_updates_are_skipped_then_stop_the_run():
    r = run_distributed(guard_run, world_size=2)[0]
    assert r["skipped"] == [1.0, 2.0]            # counted and logged; the weights never moved
    assert r["unchanged"]
    assert "3 optimizer steps in a row were skipped, the last because non-finite gradient norm" in r["error"]


def test_dr_grpo_norm_constant_is_the_steps_response_budget_at_run_time():
    """seq-mean-token-sum-norm without norm_const divides by the budget the samples carry
    (GlobalCounts.budget, the step's largest), exactly as an explicit norm_const would."""
    from algorithms.drgrpo import DrGRPOLoss
    from core.batch import GlobalCounts, global_counts
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mb = Batch(response_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]), old_logp=torch.zeros(2, 3),
               advantages=torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]), response_budget=torch.tensor([8, 8]))
    assert "response_budget" in DrGRPOLoss().inputs()
    runtime, _ = DrGRPOLoss(log_entropy=False)(logp, None, mb, GlobalCounts(tokens=3.0, seqs=2.0, budget=8.0))
    fixed, _ = DrGRPOLoss(log_entropy=False, norm_const=8.0)(logp, None, mb, GlobalCounts(tokens=3.0, seqs=2.0))
    # ratio exp(logp): -(e^-1 + e^-2) * 1 for sample 0 (A > 0: the unclipped term is the max);
    # sample 1 has A = -2 and ratio e^-0.5 < 0.8, so the clipped term 2 * 0.8 is the max; / (B C)
    want = (-(math.exp(-1) + math.exp(-2)) + 2 * 0.8) / (2 * 8)
    assert runtime.item() == pytest.approx(want) and fixed.item() == pytest.approx(want)
    with pytest.raises(ValueError, match="needs norm_const"):
        DrGRPOLoss(log_entropy=False)(logp, None, mb, GlobalCounts(tokens=3.0, seqs=2.0))
    assert global_counts(mb).budget == 8.0
