"""Rollout correction (algorithms/correction.py): mismatch metrics, truncated and masked IS, the
geometric mask and bypass against hand-computed values; TIS's per-token gradient; a forced
mismatch (the torch engine in bfloat16, the trainer in float32) seen by the metrics, with TIS
weights equal to hand-computed ones; and the whole path on 2 processes."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from algorithms.common import correct_rollout, policy_update
from algorithms.correction import RolloutCorrection, correct, mismatch_metrics
from algorithms.grpo import GRPOConfig
from algorithms.losses import PolicyLoss
from core.batch import Batch, GlobalCounts
from core.models import batched_logprobs, build_model
from roles.rollout.engine import SamplingParams
from roles.rollout.torch_engine import TorchEngine
from tests.helpers import tiny_model_config
from tests.test_train_e2e import read_metrics, torchrun

# d = old - rollout per token; row 0 has 3 tokens, row 1 two (and a padded NaN), row 2 one.
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, float("nan")], [-2.0, 0.0, 0.0]])
D = [[0.1, -0.3, 0.9], [0.05, 0.02], [-1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])


def rollout_logp() -> torch.Tensor:
    out = OLD.clone()
    for i, row in enumerate(D):
        for t, d in enumerate(row):
            out[i, t] = OLD[i, t] - d
    return out


def test_mismatch_metrics_hand_computed():
    m = mismatch_metrics(OLD, rollout_logp(), MASK)
    flat = [d for row in D for d in row]
    assert m["mismatch/kl_k1"] == pytest.approx(sum(-d for d in flat) / 6, rel=1e-5)
    assert m["mismatch/kl_k3"] == pytest.approx(sum(math.exp(d) - d - 1 for d in flat) / 6, rel=1e-5)
    ppl = [math.exp(-sum(row) / len(row)) for row in D]  # trainer PPL / engine PPL per sequence
    assert m["mismatch/ppl_ratio"] == pytest.approx(sum(ppl) / 3, rel=1e-5)
    assert m["mismatch/max_abs_logratio"] == pytest.approx(1.0, rel=1e-5)
    zero = mismatch_metrics(OLD, OLD, MASK)
    assert zero["mismatch/kl_k1"] == zero["mismatch/kl_k3"] == zero["mismatch/max_abs_logratio"] == 0.0


def test_truncated_is_weights_token_and_sequence_hand_computed():
    w, keep, m = correct(OLD, rollout_logp(), MASK, RolloutCorrection(is_level="token", is_cap=1.5))
    assert keep is None
    want = [[math.exp(0.1), math.exp(-0.3), 1.5], [math.exp(0.05), math.exp(0.02), 0.0], [math.exp(-1.0), 0, 0]]
    torch.testing.assert_close(w, torch.tensor(want))
    assert not w.requires_grad
    assert m["rollout_correction/is_truncated_frac"] == pytest.approx(1 / 6)  # e^0.9 = 2.46 > 1.5
    assert m["rollout_correction/is_weight_mean"] == pytest.approx(sum(map(sum, want)) / 6, rel=1e-6)
    w, _, m = correct(OLD, rollout_logp(), MASK, RolloutCorrection(is_level="sequence", is_cap=1.5))
    seq = [min(math.exp(sum(row)), 1.5) for row in D]  # e^0.7 -> 1.5, e^0.07, e^-1
    torch.testing.assert_close(w, torch.tensor([[seq[0]] * 3, [seq[1]] * 2 + [0.0], [seq[2], 0, 0]]))
    assert m["rollout_correction/is_truncated_frac"] == pytest.approx(1 / 3)  # one sequence of three


@pytest.mark.parametrize("cfg, kept, token_frac, seq_frac", [
    # IcePop on tokens: e^0.9 = 2.46 and e^-1 = 0.37 fall outside [0.5, 2]
    (RolloutCorrection(mask_level="token", mask_low=0.5, mask_high=2.0),
     [[1, 1, 0], [1, 1, 0], [0, 0, 0]], 2 / 6, 2 / 3),
    # sequence products e^0.7 = 2.01, e^0.07, e^-1: the first and last leave
    (RolloutCorrection(mask_level="sequence", mask_low=0.5, mask_high=2.0),
     [[0, 0, 0], [1, 1, 0], [0, 0, 0]], 4 / 6, 2 / 3),
    # geometric means e^(0.7/3) = 1.26, e^0.035 = 1.036, e^-1: only the second is in [0.8, 1.1]
    (RolloutCorrection(geo_mask=True, geo_low=0.8, geo_high=1.1), [[0, 0, 0], [1, 1, 0], [0, 0, 0]], 4 / 6, 2 / 3),
    (RolloutCorrection(geo_mask=True, geo_low=0.3, geo_high=1.3), [[1, 1, 1], [1, 1, 0], [1, 0, 0]], 0.0, 0.0),
])
def test_masks_hand_computed(cfg, kept, token_frac, seq_frac):
    w, keep, m = correct(OLD, rollout_logp(), MASK, cfg)
    assert w is None and keep.tolist() == kept and keep.dtype == MASK.dtype
    assert m["rollout_correction/masked_token_frac"] == pytest.approx(token_frac)
    assert m["rollout_correction/masked_seq_frac"] == pytest.approx(seq_frac)


def test_correction_node_merges_the_overlong_filter_and_orders_outputs():
    cfg = RolloutCorrection(is_level="token", mask_level="token", mask_low=0.5, mask_high=2.0)
    out = correct_rollout(OLD, rollout_logp(), MASK, ["stop", "length", "stop"], cfg=cfg)
    weights, loss_mask = out.value
    assert weights.shape == MASK.shape
    assert loss_mask.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]  # row 1 was truncated
    assert set(out.metrics) == {"rollout_correction/is_weight_mean", "rollout_correction/is_truncated_frac",
                                "rollout_correction/masked_token_frac", "rollout_correction/masked_seq_frac"}


def test_policy_update_builds_the_nodes_it_needs():
    def names(c: GRPOConfig) -> list[str]:
        return [n.name for n in policy_update(c)]

    assert names(GRPOConfig()) == ["mismatch", "update_actor"]
    assert names(GRPOConfig(recompute_old_logp=False)) == ["update_actor"]  # bypass: old = rollout
    on = GRPOConfig(rollout_correction=RolloutCorrection(is_level="token", geo_mask=True), overlong_filter=True)
    nodes = policy_update(on)
    assert [n.name for n in nodes] == ["mismatch", "rollout_correction", "update_actor"]
    assert nodes[1].outputs == ("rollout_is_weights", "loss_mask") and "finish_reason" in nodes[1].inputs
    assert {"rollout_is_weights", "loss_mask"} <= set(nodes[2].inputs)
    only_is = policy_update(GRPOConfig(rollout_correction=RolloutCorrection(is_level="sequence"),
                                       overlong_filter=True))
    assert [n.name for n in only_is] == ["mismatch", "rollout_correction", "overlong_filter", "update_actor"]
    with pytest.raises(ValueError, match="bypass"):
        policy_update(GRPOConfig(recompute_old_logp=False, rollout_correction=RolloutCorrection(is_level="token")))
    with pytest.raises(ValueError, match="0 <= low < high"):
        RolloutCorrection(mask_low=2.0, mask_high=1.0)


def test_tis_weight_scales_each_tokens_surrogate_and_its_gradient():
    """PPO clip (range 0.2) at ratio r = e^l per token, times the detached TIS weight w:
    value sum w (-A r) / N for unclipped tokens, d/dlogp = -w A r / N; a clipped token stays 0."""
    log_r = torch.tensor([[0.1, -0.1, 0.5]])  # the last is clipped (A > 0, ratio 1.65)
    old = torch.tensor([[-1.0, -2.0, -1.5]])
    logp = (old + log_r).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 1.0]])
    w = torch.tensor([[1.5, 0.25, 2.0]])
    mb = Batch(old_logp=old, advantages=adv, response_mask=torch.ones(1, 3, dtype=torch.long), rollout_is_weights=w)
    loss, _ = PolicyLoss(log_entropy=False)(logp, None, mb, GlobalCounts(tokens=3.0, seqs=1.0))
    (grad,) = torch.autograd.grad(loss, logp)
    r = [math.exp(0.1), math.exp(-0.1)]
    assert float(loss.detach()) == pytest.approx((1.5 * -r[0] + 0.25 * 2 * r[1] + 2.0 * -1.2) / 3, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.5 * r[0] / 3, 0.25 * 2 * r[1] / 3, 0.0]]))


@pytest.fixture(scope="module")
def generations():
    """The same tiny policy: a float32 trainer copy, engines in float32 and in bfloat16."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), seed=0)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 0, 0, 9, 8]])
    mask = (prompts != 0).long()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = TorchEngine(copy.deepcopy(model), pad_token_id=0, device=torch.device("cpu"), dtype=dtype)
        gen = engine.generate(prompts, mask, SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=3))
        batch = Batch(prompt_ids=prompts.repeat_interleave(4, 0), prompt_mask=mask.repeat_interleave(4, 0),
                      response_ids=gen.response_ids, response_mask=gen.response_mask)
        out[dtype] = (batched_logprobs(model, batch, micro_batch_size=16), gen.logp, gen.response_mask)
    return out


def test_forced_mismatch_bfloat16_engine_is_seen_and_tis_weights_match_by_hand(generations):
    old, rollout, mask = generations[torch.float32]
    clean = mismatch_metrics(old, rollout, mask)
    assert clean["mismatch/max_abs_logratio"] < 1e-4 and abs(clean["mismatch/kl_k1"]) < 1e-6
    old, rollout, mask = generations[torch.bfloat16]
    seen = mismatch_metrics(old, rollout, mask)
    assert seen["mismatch/max_abs_logratio"] > 100 * max(clean["mismatch/max_abs_logratio"], 1e-6)
    assert seen["mismatch/kl_k3"] > 100 * max(clean["mismatch/kl_k3"], 1e-12)
    # TIS weights, by hand, token by token, with a cap inside the observed ratios
    ratios = [math.exp(float(old[i, t]) - float(rollout[i, t]))
              for i in range(len(mask)) for t in range(mask.shape[1]) if mask[i, t]]
    cap = sorted(ratios)[len(ratios) * 3 // 4]
    w, _, m = correct(old, rollout, mask, RolloutCorrection(is_level="token", is_cap=cap))
    k = 0
    for i in range(len(mask)):
        for t in range(mask.shape[1]):
            want = min(ratios[k], cap) if mask[i, t] else 0.0
            k += int(bool(mask[i, t]))
            assert float(w[i, t]) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert m["rollout_correction/is_truncated_frac"] == pytest.approx(sum(r > cap for r in ratios) / len(ratios))
    assert 0 < m["rollout_correction/is_truncated_frac"] < 0.5


@pytest.mark.dist
def test_bfloat16_engine_on_two_ranks_logs_mismatch_and_corrects(tmp_path):
    """The quickstart for one step with the engine in bfloat16 and TIS + IcePop on: the
    mismatch and correction metrics are logged, and see the mismatch."""
    out = tmp_path / "bf16"
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", "run.steps=1", "data.prompts_per_step=8",
             "rollout.n=4", "eval.every=0", "data.task.eval_size=20", "data.task.train_size=2000",
             "tracking.enabled=false", "checkpoint.export_hf=false", "rollout.dtype=bfloat16",
             "algorithm.rollout_correction.is_level=token", "algorithm.rollout_correction.mask_level=token",
             "algorithm.rollout_correction.mask_low=0.99", "algorithm.rollout_correction.mask_high=1.01")
    row = read_metrics(out)[1]
    assert row["mismatch/max_abs_logratio"] > 1e-3 and row["mismatch/kl_k3"] > 1e-7
    assert row["rollout_correction/masked_token_frac"] > 0
    assert row["rollout_correction/is_weight_mean"] != 1.0
