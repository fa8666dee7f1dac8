"""TRAIN -> GENERATE: weights resharded from FSDP2 into the engine, checked bit for bit, and the
engine's generations against a single-process model with the same weights and seed."""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import VOCAB, random_batch, tiny_model_config

pytestmark = pytest.mark.dist

PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 0, 0, 9, 8], [0, 11, 12, 13, 14]])
PROMPT_MASK = (PROMPTS != 0).long()


def trained_actor_synced(engine_dtype: str) -> dict:
    """Actor sharded over the ranks, one update (so weights differ from init), one sync."""
    from algorithms.losses import PolicyLoss
    from core import dist
    from core.hybrid import HybridConfig, HybridEngine
    from core.models import build_model, dtype_of, shard_model
    from roles.actor import Actor
    from roles.rollout.engine import SamplingParams
    from roles.rollout.torch_engine import TorchEngine

    cfg = tiny_model_config()
    actor = Actor(Actor.Config(lr=1e-2), shard_model(build_model(cfg, seed=0), dist.mesh()),
                  total_steps=1)
    batch = random_batch(0, B=8)
    actor.update(batch.with_fields(old_logp=actor.log_probs(batch)), loss_fn=PolicyLoss())
    dtype = dtype_of(engine_dtype)
    engine = TorchEngine(build_model(cfg, seed=123), pad_token_id=0, device=torch.device("cpu"),
                         dtype=dtype)
    hybrid = HybridEngine(HybridConfig(bucket_mb=0.01), actor=actor, rollout=engine,
                          engine_dtype=dtype, device=torch.device("cpu"))
    sync = hybrid.sync_weights()
    full = {n: p.full_tensor().detach().clone() for n, p in actor.model.named_parameters()}
    engine_w = {n: t.detach().clone() for n, t in engine.named_weights()}
    sampling = SamplingParams(temperature=1.0, top_k=8, top_p=0.9, max_new_tokens=6, n=3,
                              stop_token_ids=(1,), seed=77)
    gen = engine.generate(PROMPTS, PROMPT_MASK, sampling)
    greedy = engine.generate(PROMPTS, PROMPT_MASK, SamplingParams(temperature=0, max_new_tokens=6,
                                                                  stop_token_ids=(1,)))
    return {"sync": sync, "actor": full, "engine": engine_w, "gen": gen, "greedy": greedy,
            "rank": dist.info().rank}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def synced(request):
    return request.param, run_distributed(trained_actor_synced, request.param, world_size=2)


def test_engine_weights_equal_actor_full_weights_bitwise(synced):
    dtype, ranks = synced
    for r in ranks:
        assert set(r["engine"]) == set(r["actor"])
        for name, full in r["actor"].items():
            expect = full.to(getattr(torch, dtype))
            assert torch.equal(r["engine"][name], expect), name
    sync = ranks[0]["sync"]
    n_bytes = sum(t.numel() * t.element_size() for t in ranks[0]["engine"].values())
    assert sync["reshard/bytes"] == n_bytes
    assert sync["reshard/buckets"] > 1  # 10 KB buckets: the model really streams in pieces
    assert sync["reshard/gbps"] > 0


def test_engine_generates_like_single_process_model(synced):
    """A plain (never sharded) model loaded with the same full weights, in a fresh engine with the
    same seed, samples the same tokens; greedy decoding also matches HF generate."""
    from core.models import build_model
    from roles.rollout.engine import SamplingParams
    from roles.rollout.torch_engine import TorchEngine

    dtype, ranks = synced
    r = ranks[0]
    model = build_model(tiny_model_config(), seed=999)
    model.load_state_dict(r["actor"])
    ref = TorchEngine(model, pad_token_id=0, device=torch.device("cpu"), dtype=getattr(torch, dtype))
    sampling = SamplingParams(temperature=1.0, top_k=8, top_p=0.9, max_new_tokens=6, n=3,
                              stop_token_ids=(1,), seed=77)
    gen = ref.generate(PROMPTS, PROMPT_MASK, sampling)
    for other in ranks:
        assert torch.equal(other["gen"].response_ids, gen.response_ids)
        assert torch.equal(other["gen"].response_mask, gen.response_mask)
        torch.testing.assert_close(other["gen"].logp, gen.logp)
    # Independent implementation: HF generate, greedy.
    hf = ref.model.generate(input_ids=PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=6,
                            do_sample=False, eos_token_id=1, pad_token_id=0)[:, PROMPTS.shape[1]:]
    greedy = r["greedy"]
    width = greedy.response_ids.shape[1]
    mask = greedy.response_mask.bool()
    assert torch.equal(greedy.response_ids[mask], hf[:, :width][mask])
    assert greedy.response_ids.shape[0] == PROMPTS.shape[0]
    assert int(greedy.response_ids.max()) < VOCAB


def gather_counts():
    """All-gathers issued by one sync of uneven FSDP2 shards, per bucket vs per parameter, and
    their results."""
    from torch.distributed.tensor.debug import CommDebugMode
    from core import dist
    from core.models import ModelConfig, build_model, shard_model
    from core.reshard import full_weight_buckets
    cfg = ModelConfig(config=dict(model_type="qwen2", hidden_size=16, intermediate_size=40,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  vocab_size=41, tie_word_embeddings=False))  # 41 rows: uneven shards
    model = shard_model(build_model(cfg, seed=1), dist.mesh())
    out = {}
    for batched in (True, False):
        with CommDebugMode() as comm:
            got = [pair for b in full_weight_buckets(model, bucket_bytes=2**30, dtype=torch.bfloat16,
                                                     batched=batched) for pair in b]
        out[batched] = (comm.get_total_counts(), got)
    return out, {n: p.detach().to(torch.bfloat16) for n, p in build_model(cfg, seed=1).named_parameters()}


@pytest.mark.dist
def test_one_all_gather_per_bucket_gives_the_full_weights():
    (runs, full), _ = run_distributed(gather_counts)
    (count_bucket, bucket), (count_param, per_param) = runs[True], runs[False]
    assert count_bucket == 1 and count_param == len(full)
    assert [n for n, _ in bucket] == list(full) == [n for n, _ in per_param]
    for (name, a), (_, b) in zip(bucket, per_param):
        assert a.dtype == torch.bfloat16 and torch.equal(a, full[name]) and torch.equal(b, full[name])
