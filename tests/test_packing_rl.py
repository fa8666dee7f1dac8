"""Packed RL batches and token-budget micro-batches (issue #17).

Packed and padded passes give the same log-probs, entropies, values, losses and gradients
(float32, 1e-6 relative) for every loss aggregation mode, on 1 and 2 gloo ranks, with uneven
lengths (a 1-token response, a response at the length budget, 5 samples on one rank and 3 on
the other); token-budget micro-batches give the same as fixed-size ones; nothing attends across
packed samples (and the check notices when something does); the plan keeps every rank's
micro-batch count equal and every micro-batch within its budget; the micro-batch loop reads
nothing back from the device. Every algorithm's golden run (packed, the default) gives the
same numbers padded.
"""
from __future__ import annotations

import dataclasses
import json
import random
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from algorithms.base import ALGORITHMS
from core.batch import Batch, global_counts
from core.microbatch import SampleSizes, micro_batch_cost, plan_micro_batches, step_counts
from core.microbatch import sample_sizes as sizes_of
from core.models import build_model, token_logprobs
from core.packing import check_packable, lay_out, pack_samples, response_logprobs
from tests.dist_utils import run_distributed
from tests.helpers import VOCAB, tiny_model_config

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CRITIC_MODES = AGG_MODES[:3]
"""ValueLoss has no normalising constant for seq-mean-token-sum-norm."""
PROMPT_LENS = [1, 6, 3, 2, 5, 4, 6, 2]
RESPONSE_LENS = [1, 7, 3, 5, 2, 7, 4, 6]
"""Uneven on purpose: a 1-token prompt and response, two responses at the budget R = 7."""
BUDGET = 7
SHARDS = [range(0, 5), range(5, 8)]
"""Two ranks hold 5 and 3 samples: the plans need idle micro-batches on the second."""


def uneven_batch(seed: int = 0) -> Batch:
    """Left-padded prompts, right-padded responses of PROMPT_LENS / RESPONSE_LENS, with the
    fields the policy and value losses read."""
    g = torch.Generator().manual_seed(seed)
    B, P, R = len(PROMPT_LENS), max(PROMPT_LENS), BUDGET
    p_len, r_len = torch.tensor(PROMPT_LENS), torch.tensor(RESPONSE_LENS)
    prompt_mask = (torch.arange(P)[None] >= P - p_len[:, None]).long()
    response_mask = (torch.arange(R)[None] < r_len[:, None]).long()
    return Batch(prompt_ids=torch.randint(3, VOCAB, (B, P), generator=g) * prompt_mask, prompt_mask=prompt_mask,
                 response_ids=torch.randint(3, VOCAB, (B, R), generator=g) * response_mask,
                 response_mask=response_mask, advantages=torch.randn(B, R, generator=g) * response_mask,
                 returns=torch.randn(B, R, generator=g) * response_mask,
                 values=0.1 * torch.randn(B, R, generator=g) * response_mask,
                 response_budget=torch.full((B,), BUDGET), scores=(torch.arange(B) % 2).float())


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6, msg: str = "") -> None:
    """Elementwise within `rel` of the tensor's scale (its largest magnitude) plus `rel` of itself."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=msg or None)


def assert_grads_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-6,
                     label: str = "") -> None:
    """Each parameter's gradient within `rel` of its norm (||got - want|| <= rel ||want||), plus
    rel x 1e-2 of the whole gradient's norm: a key projection's bias has a gradient that is 0 in
    exact arithmetic (softmax ignores a shift shared by all keys), float noise in practice."""
    assert set(got) == set(want), label
    total = float(torch.sqrt(sum(g.double().square().sum() for g in want.values())))
    for name, w in want.items():
        err = float((got[name].double() - w.double()).norm())
        assert err <= rel * (float(w.double().norm()) + 1e-2 * total), \
            f"{label} {name}: |diff| {err:.3g}, |grad| {float(w.norm()):.3g}"


def loss_scale(batch: Batch, mode: str) -> float:
    """The size of a policy loss's terms under `mode`: the aggregate of |advantage| over the
    step. Float32 rounding of the loss is relative to it, not to the (cancelling) sum."""
    from algorithms.losses import aggregate
    counts = step_counts([sizes_of(batch)])
    return float(aggregate(batch.advantages.abs(), batch.response_mask, mode, counts, norm_const=BUDGET))


# ---- layout and exactness, one process --------------------------------------------------------


def test_rl_layout_by_hand():
    """Rows as wide as the longest sample, filled longest first; positions restart per sample;
    the kept columns predict response tokens; scatter back lands on the response layout."""
    b = Batch(prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
              prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
              response_ids=torch.tensor([[10, 11, 0], [12, 0, 0], [13, 14, 15]]),
              response_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))
    packed = pack_samples(b, sizes_of(b), one_row=False)
    # lengths 4, 4, 4 -> width 4, one sample per row, in row order (ties keep row order)
    assert packed.ids_BL.tolist() == [[5, 6, 10, 11], [7, 8, 9, 12], [4, 13, 14, 15]]
    assert packed.pos_BL.tolist() == [[0, 1, 2, 3]] * 3
    assert packed.keep_K.tolist() == [0, 1, 2]
    assert packed.targets_N.tolist() == [10, 11, 12, 13, 14, 15]
    values = packed.to_samples(torch.arange(1.0, 7.0))
    assert values.tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6]]
    one = pack_samples(b, sizes_of(b), one_row=True)
    assert one.ids_BL.tolist() == [[5, 6, 10, 11, 7, 8, 9, 12, 4, 13, 14, 15]]
    assert one.pos_BL.tolist() == [[0, 1, 2, 3] * 3]
    assert one.keep_K.tolist() == [1, 2, 6, 8, 9, 10]  # the positions before each response token


def test_shared_layout_pads_by_continuing_the_last_sequence():
    layout = lay_out([3, 2, 4], [[0, 1], [2]], 6)
    assert layout.pos_BL.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert layout.slot_N.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_logprobs_entropy_and_gradients_equal_padded(one_row):
    model = build_model(tiny_model_config(), seed=0)
    batch = uneven_batch()
    packed = pack_samples(batch, sizes_of(batch), one_row=one_row)
    want = token_logprobs(model, batch, temperature=0.7, with_entropy=True)
    got = response_logprobs(model, batch, packed, temperature=0.7, with_entropy=True)
    weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for logp, ent in (want, got):
        assert ent is not None
        model.zero_grad(set_to_none=True)
        ((logp * weights).sum() + ent.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert_rel(got[0], want[0])
    assert_rel(got[1], want[1])  # type: ignore[arg-type]
    assert (got[0][batch.response_mask == 0] == 0).all()
    for name, g in grads[0].items():
        assert_rel(grads[1][name], g, msg=name)


def test_nothing_attends_across_packed_samples():
    """Changing one sample's tokens leaves every other sample's log-probs unchanged; with
    positions that do not restart (one long sequence per row) they change: the check can fail."""
    model = build_model(tiny_model_config(), seed=0)
    batch = uneven_batch()
    other = batch.with_fields(prompt_ids=torch.where(torch.arange(8)[:, None] == 1, 3, batch.prompt_ids))
    for b in (batch, other):
        assert b.prompt_mask.sum() == batch.prompt_mask.sum()
    base, changed = (response_logprobs(model, b, pack_samples(b, sizes_of(b), one_row=True))[0] for b in (batch, other))
    keep = torch.arange(8) != 1
    torch.testing.assert_close(changed[keep], base[keep], rtol=0, atol=1e-7)
    assert (changed[1] - base[1]).abs().max() > 1e-4
    leaky = pack_samples(batch, sizes_of(batch), one_row=True)
    leaky = dataclasses.replace(leaky, pos_BL=torch.arange(leaky.ids_BL.shape[1])[None])
    wrong = response_logprobs(model, batch, leaky)[0]
    assert (wrong[2:] - base[2:]).abs().max() > 1e-3


def test_packed_values_equal_padded():
    from roles.critic import ValueModel, response_values
    model = ValueModel(build_model(tiny_model_config(), seed=0), head_init_std=0.1, seed=0)
    batch = uneven_batch()
    want = response_values(model, batch)
    for one_row in (False, True):
        got = response_values(model, batch, pack_samples(batch, sizes_of(batch), one_row=one_row))
        assert_rel(got, want)
        assert (got[batch.response_mask == 0] == 0).all()


def test_packing_refuses_masks_with_holes_and_empty_prompts():
    holes = uneven_batch().with_fields(response_mask=uneven_batch().response_mask.clone())
    holes.response_mask[1, 2] = 0
    with pytest.raises(ValueError, match="without holes"):
        check_packable(sizes_of(holes))
    empty = uneven_batch()
    empty.prompt_mask[0] = 0
    with pytest.raises(ValueError, match="non-empty prompt"):
        check_packable(sizes_of(empty))


def test_sizes_give_the_global_counts():
    batch = uneven_batch().with_fields(loss_mask=uneven_batch().response_mask * (torch.arange(8) != 3)[:, None])
    assert step_counts([sizes_of(batch)]) == global_counts(batch)
    assert step_counts([sizes_of(batch)]).budget == BUDGET


# ---- the micro-batch plan -------------------------------------------------------------------


def long_tail(n: int, seed: int) -> SampleSizes:
    """Responses of 5-300 tokens with mean ~60 (the benchmark's distribution), prompts 10-40."""
    rng = random.Random(seed)
    resp = [min(300, max(5, int(rng.lognormvariate(3.7, 0.8)))) for _ in range(n)]
    prompt = [rng.randint(10, 40) for _ in range(n)]
    return SampleSizes(prompt=prompt, response=resp, prompt_span=prompt, response_span=resp,
                       loss_tokens=[float(r) for r in resp], budget=None)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_plan_on_every_rank(packed):
    """Same number of micro-batches on every rank; every sample exactly once; each micro-batch
    within the budget unless it holds a single sample over it; the costliest run first; the
    i-th micro-batches of the ranks are balanced."""
    ranks = [long_tail(40, 0), long_tail(28, 1), long_tail(40, 2)]
    ranks[1].response[3] = ranks[1].response_span[3] = 2000  # over the budget: alone
    budget = 1024
    plans = [plan_micro_batches(ranks, r, micro_batch_size=4, max_tokens=budget, packed=packed)
             for r in range(len(ranks))]
    assert len({len(p) for p in plans}) == 1
    for sizes, plan in zip(ranks, plans):
        assert sorted(i for b in plan for i in b) == list(range(len(sizes)))
        costs = [micro_batch_cost(sizes, b, packed=packed) for b in plan]
        assert all(c <= budget or len(b) == 1 for b, c in zip(plan, costs))
        assert costs == sorted(costs, reverse=True)
    assert [3] in plans[1]
    # fewer micro-batches would not fit: k is the smallest that fits every rank
    k = len(plans[0])
    total = max(sum(micro_batch_cost(s, [i], packed=packed) for i in range(len(s))) for s in ranks)
    assert k >= -(-total // budget)
    if packed:  # balanced: no micro-batch of a rank (apart from the lone oversized one) is far from its mean
        for sizes, plan in zip((ranks[0], ranks[2]), (plans[0], plans[2])):
            costs = [micro_batch_cost(sizes, b, packed=True) for b in plan]
            assert max(costs) - min(costs) <= max(sizes.tokens(i) for i in range(len(sizes)))


def test_fixed_size_plan_keeps_consecutive_runs_and_pads_with_idle_micro_batches():
    ranks = [long_tail(8, 0), long_tail(3, 1)]
    assert plan_micro_batches(ranks, 0, micro_batch_size=3, max_tokens=None, packed=True) == \
        [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert plan_micro_batches(ranks, 1, micro_batch_size=3, max_tokens=None, packed=True) == [[0, 1, 2], [], []]


# ---- actor, critic and reference on 1 and 2 ranks ----------------------------------------------

VARIANTS: dict[str, dict] = {
    "padded": dict(packing=False, micro_batch_size=8),
    "padded_mbs3": dict(packing=False, micro_batch_size=3),
    "padded_budget": dict(packing=False, max_tokens_per_micro_batch=40),
    "packed": dict(packing=True, micro_batch_size=8),
    "packed_mbs3": dict(packing=True, micro_batch_size=3),
    "packed_budget": dict(packing=True, max_tokens_per_micro_batch=24),
    "packed_one_row": dict(packing=True, max_tokens_per_micro_batch=30),
    "packed_checkpointed": dict(packing=True, micro_batch_size=3, activation_checkpointing=True),
}
"""Actor/critic configs compared with "padded" on one process (one micro-batch of 8)."""


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _shard(batch: Batch) -> Batch:
    from core import dist
    info = dist.info()
    return batch if info.world_size == 1 else batch.select(SHARDS[info.rank])


@contextmanager
def no_device_reads() -> Iterator[None]:
    """Any read of a tensor's value on the host (item, tolist, float(), int(), cpu(), numpy)
    raises: the micro-batch loop must not wait for the device."""
    names = ["item", "tolist", "__float__", "__int__", "cpu", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(*_a, **_k):
            raise AssertionError(f"Tensor.{name} called inside the micro-batch loop")
        return f
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def role_runs() -> dict:
    """Per variant: the actor's log-probs, then for each aggregation mode the loss, metrics and
    full gradient of one optimizer step; the critic's values and value-loss gradients; the
    reference's log-probs; and two optimizer steps' metrics (token-mean)."""
    from algorithms.losses import PolicyLoss, ValueLoss
    from core import dist
    from core.models import shard_model
    from roles.actor import Actor
    from roles.critic import Critic, ValueModel
    from roles.reference import Reference

    full = uneven_batch()
    plain = build_model(tiny_model_config(), seed=0)
    old = token_logprobs(plain, full)[0].detach()
    noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * full.response_mask
    batch = _shard(full.with_fields(old_logp=old + 0.1 * noise))
    out: dict = {}
    for name, over in VARIANTS.items():
        actor = Actor(Actor.Config(lr=1e-2, **over), shard_model(build_model(tiny_model_config(), seed=0), dist.mesh()),
                      total_steps=10)
        if name == "packed_one_row":
            actor.train_state.one_row = True
        res: dict = {"log_probs": actor.log_probs(batch)}
        for mode in AGG_MODES:
            loss_fn = PolicyLoss(agg_mode=mode, entropy_coef=0.01, kl_coef=0.0, nll_coef=0.1)
            if name == "packed_mbs3" and mode == "token-mean":
                actor.model.train()
                t = actor.train_state
                plan, counts = t._plan(batch, dist.all_gather_objects(sizes_of(batch)))
                with no_device_reads():
                    t._accumulate(plan, counts, actor._micro_loss(loss_fn))
                actor.optimizer.zero_grad(set_to_none=True)
            metrics = actor.accumulate(batch, loss_fn)
            res[mode] = {"metrics": metrics, "grads": _full_grads(actor.model)}
            actor.optimizer.zero_grad(set_to_none=True)
        res["update"] = [actor.update(batch, loss_fn=PolicyLoss()).metrics for _ in range(2)]
        critic = Critic(Critic.Config(lr=1e-2, **over),
                        shard_model(ValueModel(build_model(tiny_model_config(), seed=0), head_init_std=0.1, seed=0),
                                    dist.mesh()), total_steps=10)
        res["values"] = critic.values(batch)
        for mode in CRITIC_MODES:
            metrics = critic.accumulate(batch, loss=ValueLoss(clip=0.05, agg_mode=mode))
            res["critic", mode] = {"metrics": metrics, "grads": _full_grads(critic.model)}
            critic.train_state.optimizer.zero_grad(set_to_none=True)
        ref_cfg = {k: v for k, v in over.items() if k in ("packing", "micro_batch_size", "max_tokens_per_micro_batch")}
        reference = Reference(Reference.Config(**ref_cfg),
                              shard_model(build_model(tiny_model_config(), seed=0), dist.mesh()), temperature=0.8)
        res["ref_logp"] = reference.log_probs(batch)
        out[name] = res
    return out


@pytest.fixture(scope="module")
def runs():
    return {"one": run_distributed(role_runs, world_size=1)[0], "two": run_distributed(role_runs, world_size=2)}


def _cases(runs):
    """(label, result, rows of the 8 samples it holds) for every variant on both world sizes."""
    for name in VARIANTS:
        yield f"{name}/1 rank", runs["one"][name], range(8)
        for rank, res in enumerate(runs["two"]):
            yield f"{name}/rank {rank} of 2", res[name], SHARDS[rank]


@pytest.mark.dist
@pytest.mark.parametrize("mode", AGG_MODES)
def test_actor_loss_and_gradients_equal_padded(runs, mode):
    want = runs["one"]["padded"][mode]
    assert want["metrics"]["loss"] != 0 and all(g.abs().max() > 0 for g in want["grads"].values())
    scale = loss_scale(uneven_batch(), mode)
    for label, res, _ in _cases(runs):
        got = res[mode]
        assert set(got["metrics"]) == set(want["metrics"]), label
        for k, v in want["metrics"].items():
            tol = {"abs": 1e-6 * scale} if k in ("loss", "pg_loss") else {"rel": 1e-6, "abs": 1e-9}
            assert got["metrics"][k] == pytest.approx(v, **tol), f"{label} {k}"
        assert_grads_rel(got["grads"], want["grads"], label=label)


@pytest.mark.dist
def test_log_probs_values_and_reference_equal_padded(runs):
    want = runs["one"]["padded"]
    for label, res, rows in _cases(runs):
        for key in ("log_probs", "values", "ref_logp"):
            assert_rel(res[key], want[key][rows][:, :res[key].shape[1]], msg=f"{label} {key}")
            assert res[key].shape[1] == BUDGET, label


@pytest.mark.dist
@pytest.mark.parametrize("mode", CRITIC_MODES)
def test_critic_loss_and_gradients_equal_padded(runs, mode):
    want = runs["one"]["padded"]["critic", mode]
    assert want["metrics"]["vf_clipfrac"] > 0  # the clip binds somewhere: both branches are tested
    for label, res, _ in _cases(runs):
        got = res["critic", mode]
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), f"{label} {k}"
        assert_grads_rel(got["grads"], want["grads"], label=label)


@pytest.mark.dist
def test_two_optimizer_steps_equal_padded(runs):
    want = runs["one"]["padded"]["update"]
    assert want[0]["actor/grad_norm"] > 0
    scale = loss_scale(uneven_batch(), "token-mean")
    for label, res, _ in _cases(runs):
        for step, (g, w) in enumerate(zip(res["update"], want)):
            assert set(g) == set(w), label
            for k, v in w.items():
                # step 2 starts from weights that differ by float rounding (Adam amplifies it)
                rel = 1e-6 if step == 0 else 1e-4
                tol = {"abs": rel * scale} if k in ("actor/loss", "actor/pg_loss") else {"rel": rel, "abs": 1e-9}
                assert g[k] == pytest.approx(v, **tol), f"{label} step {step} {k}"


# ---- every algorithm, padded, against the (packed) golden numbers ----------------------------------

PADDED = ["actor.packing=false", "critic.packing=false", "reference.packing=false"]
"""The golden runs use the default, packed; these runs the padded layout."""


def packed_tolerance(key: str, golden: float) -> dict[str, float]:
    """The golden tolerance (1e-4 relative; ~0 values stay ~0), except `mismatch/*`: those
    measure the float rounding between the engine's and the trainer's log-probs themselves, so
    another summation order moves them by their own size (~1e-6): 1e-5 absolute; and losses
    (measured: the layouts differ in actor/loss by ~4e-8 on 2.4e-4 at step 3, 3e-4 relative)."""
    if key.startswith("mismatch/"):
        return {"rel": 0.0, "abs": 1e-5}
    if key.endswith("loss"):  # a mean of O(1) per-token terms that cancel to ~1e-4: float32
        return {"rel": 1e-4, "abs": 1e-6}  # rounding of the terms (~1e-7 each) is absolute, not relative
    from tests.test_algorithms_e2e import tolerance
    return tolerance(golden, key)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.breadth
@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_runs_padded_match_the_packed_golden_numbers(tmp_path, name):
    from tests.test_algorithms_e2e import EXTRA, GOLDEN_DIR, SMALL, comparable
    from tests.test_train_e2e import read_metrics, torchrun
    out = tmp_path / name
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", f"algorithm.name={name}", *SMALL,
             *EXTRA.get(name, []), *PADDED)
    rows = [comparable(r) for r in read_metrics(out)]
    golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text())["rows"]
    assert len(rows) == len(golden)
    for g, w in zip(rows, golden):
        assert set(g) == set(w), f"step {w['step']}: {sorted(set(g) ^ set(w))}"
        for k, want in w.items():
            if isinstance(want, str):
                assert g[k] == want
            else:
                assert g[k] == pytest.approx(want, **packed_tolerance(k, want)), f"step {w['step']} {k}"
