"""Shared prompts (issue #19): samples with the same prompt run it once, in training and in
generation.

The actor's and the reference's forward (`core.models.shared_prompt_logits`) give the log-probs,
entropies and gradients of the full forward (float32, 1e-5 relative), on 1 and on 2 FSDP2 gloo
ranks (two forwards before one backward: the prompt's gradient arrives through the KV cache),
also where one rank's samples share no prompt; a micro-batch takes the shared layout only where
it runs fewer tokens than packing, summed over the ranks (so every rank runs the same forwards);
the torch engine's shared prefill generates exactly the tokens of one prefill row per request.
"""
from __future__ import annotations

import random

import pytest
import torch

from core.batch import Batch
from core.microbatch import sample_sizes
from core.models import build_model, prompt_groups, shared_prompt_tokens, token_logprobs
from core.packing import micro_batches
from tests.dist_utils import run_distributed
from tests.helpers import VOCAB, random_batch, tiny_model_config


def grouped_batch(seed: int = 0, *, groups: int = 2, n: int = 4, R: int = 5) -> Batch:
    """random_batch with n consecutive rows sharing each prompt (a GRPO layout)."""
    b = random_batch(seed, B=groups * n, R=R)
    same = torch.arange(groups * n) // n * n
    return b.with_fields(prompt_ids=b.prompt_ids[same], prompt_mask=b.prompt_mask[same])


def test_prompt_groups_by_hand():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    b = Batch(prompt_ids=ids, prompt_mask=mask, response_ids=torch.ones(4, 2, dtype=torch.long),
              response_mask=torch.ones(4, 2, dtype=torch.long))
    g = prompt_groups(b)
    assert ids[g.first].tolist() == [[0, 5, 6], [7, 8, 9]]  # the first row of each distinct prompt
    assert g.first[g.inverse].tolist() == [0, 0, 2, 0]
    # the same ids under another mask are another prompt: all distinct, G = B
    distinct = prompt_groups(b.with_fields(prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1]]),
                                           prompt_ids=torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 0, 6]])))
    assert sorted(distinct.first.tolist()) == [0, 1, 2, 3]
    assert sorted(distinct.inverse.tolist()) == [0, 1, 2, 3]
    # G = 2 prompts of width 3 once, then 4 rows x (R - 1) = 1 response input each
    assert shared_prompt_tokens(2, 4, 3, 2) == 2 * 3 + 4 * 1


@pytest.mark.parametrize("R", [1, 5])
@pytest.mark.parametrize("grouped", [True, False])
def test_shared_logprobs_entropy_and_gradients_equal_the_full_forward(R, grouped):
    model = build_model(tiny_model_config(), seed=0)
    batch = grouped_batch(R=R) if grouped else random_batch(0, R=R)  # distinct prompts: G = B
    shared = batch.with_fields(prompt_group=prompt_groups(batch).inverse)
    assert (prompt_groups(batch).first.numel() < len(batch)) == grouped
    out = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, shared if share else batch, with_entropy=True, temperature=0.7)
        # a loss of both outputs, weighted per token, so every position's gradient counts
        w = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)
        ((logp * w).sum() + 0.3 * (ent * w).sum()).backward()
        out[share] = (logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp0, e0, g0), (lp1, e1, g1) = out[False], out[True]
    assert (lp0 != 0).any()
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (lp1[batch.response_mask == 0] == 0).all()  # 0 at padding, as the full forward


def test_a_micro_batch_shares_only_where_that_runs_fewer_tokens_than_packing():
    from roles.actor import Actor
    spec = Actor.Config(lr=1e-3, micro_batch_size=8)
    short = grouped_batch(R=5)  # 2 prompts x 4 samples, responses of 1..5 tokens
    (mb,) = micro_batches(short, spec, share_prompts=True)
    assert mb.packed is None  # shared and padded: 2 x 6 + 8 x 4 = 44 slots < the packed tokens
    assert mb.batch.prompt_group.tolist() == prompt_groups(short).inverse.tolist()
    sizes = sample_sizes(short)
    assert shared_prompt_tokens(2, 8, 6, 5) < sum(sizes.tokens(i) for i in range(8))
    (mb,) = micro_batches(short, spec, share_prompts=False)
    assert mb.packed is not None and "prompt_group" not in mb.batch
    # padded (packing off): shared wherever prompts repeat
    (mb,) = micro_batches(short, Actor.Config(lr=1e-3, micro_batch_size=8, packing=False), share_prompts=True)
    assert mb.packed is None and "prompt_group" in mb.batch
    # one long response among short ones: packing runs fewer tokens than padding every row to it
    uneven = grouped_batch(R=40)
    mask = torch.zeros_like(uneven.response_mask)
    mask[:, :2] = 1
    mask[0, :] = 1
    uneven = uneven.with_fields(response_mask=mask, response_ids=uneven.response_ids.clamp(min=3) * mask)
    (mb,) = micro_batches(uneven, spec, share_prompts=True)
    assert mb.packed is not None and "prompt_group" not in mb.batch
    # distinct prompts: nothing to share, packed as before
    (mb,) = micro_batches(random_batch(0, B=8), spec, share_prompts=True)
    assert mb.packed is not None and "prompt_group" not in mb.batch


def test_activation_checkpointing_turns_sharing_off():
    from roles.actor import Actor
    model = build_model(tiny_model_config(), seed=0)
    on = Actor(Actor.Config(lr=1e-3), model, total_steps=1)
    assert on.train_state.share_prompts
    off = Actor(Actor.Config(lr=1e-3, activation_checkpointing=True), build_model(tiny_model_config(), seed=0),
                total_steps=1)
    assert not off.train_state.share_prompts


def _fsdp_grads(share: bool, packing: bool) -> dict:
    from algorithms.losses import PolicyLoss
    from core import dist
    from core.models import shard_model
    from roles.actor import Actor
    model = shard_model(build_model(tiny_model_config(), seed=0), dist.mesh())
    actor = Actor(Actor.Config(lr=1e-2, micro_batch_size=4, packing=packing), model, total_steps=4,
                  share_prompts=share)
    # rank 0: 2 prompts x 4 samples; rank 1: 8 distinct prompts (the ranks disagree locally, the
    # choice is made for both: they must run the same forwards, FSDP2 gathers in each)
    info = dist.info()
    mine = grouped_batch(groups=2, n=4) if info.rank == 0 else random_batch(1, B=8)
    old = actor.log_probs(mine)
    mine = mine.with_fields(old_logp=old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)))
    loss_fn = PolicyLoss(agg_mode="token-mean")
    metrics = actor.accumulate(mine, loss_fn)
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for k, p in actor.model.named_parameters()}
    actor.optimizer.zero_grad(set_to_none=True)
    actor.update(mine, loss_fn=loss_fn)
    params = {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for k, p in actor.model.named_parameters()}
    return {"old": old, "loss": metrics["loss"], "grads": grads, "params": params}


@pytest.mark.dist
def test_shared_prompts_on_two_fsdp_ranks_equal_the_full_forward():
    """Two forwards (prompt, then responses on its cache) before one backward: FSDP2 reduces the
    gradients of both, so the gradients and the parameters after a step equal the full forward's."""
    for rank, (off, on) in enumerate(zip(run_distributed(_fsdp_grads, False, False),
                                         run_distributed(_fsdp_grads, True, False))):
        torch.testing.assert_close(on["old"], off["old"], rtol=1e-5, atol=1e-6)
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5, abs=1e-7)
        for name in off["grads"]:
            torch.testing.assert_close(on["grads"][name], off["grads"][name], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {name}")
            # AdamW divides by the gradient's own size, so a rounding-level difference of a ~0
            # gradient moves a parameter by up to ~lr x 1e-4 (lr 1e-2)
            torch.testing.assert_close(on["params"][name], off["params"][name], rtol=1e-5, atol=1e-5)
        assert any(g.abs().max() > 0 for g in on["grads"].values())


@pytest.mark.dist
def test_ranks_that_disagree_take_the_same_layout():
    """With packing on, rank 0 alone would share (short responses, repeated prompts) and rank 1
    alone would pack (distinct prompts): the summed token counts decide for both, and the step
    runs (a rank choosing alone would run one forward more than the other and hang)."""
    for off, on in zip(run_distributed(_fsdp_grads, False, True), run_distributed(_fsdp_grads, True, True)):
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5, abs=1e-7)
        for name in off["grads"]:
            torch.testing.assert_close(on["grads"][name], off["grads"][name], rtol=1e-5, atol=1e-6)


def test_shared_prefill_generates_the_tokens_of_one_row_per_request():
    from roles.rollout.engine import Request, SamplingParams
    from roles.rollout.torch_engine import TorchEngine, TorchEngineConfig
    model = build_model(tiny_model_config(), seed=0)
    rng = random.Random(0)
    prompts = [tuple(rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 7))) for _ in range(6)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=(2,))
    # groups of 4 requests per prompt, plus a continued partial rollout (its own prefill row)
    reqs = [Request(prompts[i // 4], sp.with_seed(i)) for i in range(24)]
    reqs.append(Request(prompts[0], sp.with_seed(99), prefix=(5, 6)))
    out = {}
    for share in (False, True):
        engine = TorchEngine(model, pad_token_id=0, device=torch.device("cpu"),
                             options=TorchEngineConfig(max_running=16), share_prefill=share)
        out[share] = engine.generate_requests(reqs)
    assert [c.tokens for c in out[True]] == [c.tokens for c in out[False]]
    for a, b in zip(out[True], out[False]):
        assert a.finish_reason == b.finish_reason
        assert a.logp == pytest.approx(b.logp, abs=1e-5)
    assert len({c.tokens for c in out[True][:4]}) > 1  # one prompt, different samples
