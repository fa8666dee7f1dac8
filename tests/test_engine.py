"""The torch rollout engine: sampling filters, stop tokens, n samples, seeds, log-probs."""
from __future__ import annotations

import math

import pytest
import torch

from core.batch import Batch
from core.models import build_model, token_logprobs
from roles.rollout.engine import SamplingParams
from roles.rollout.sampling import truncate
from roles.rollout.torch_engine import TorchEngine
from tests.helpers import tiny_model_config

PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 0, 0, 9, 8]])
MASK = (PROMPTS != 0).long()


@pytest.fixture(scope="module")
def engine():
    return TorchEngine(build_model(tiny_model_config(), seed=0), pad_token_id=0,
                       device=torch.device("cpu"))


def test_top_k_and_top_p_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(truncate(logits, SamplingParams(top_k=2))) == [True, True, False, False]
    # mass before each token: 0, .5, .8, .95 -> with top_p .7 keep the first two
    assert kept(truncate(logits, SamplingParams(top_p=0.7))) == [True, True, False, False]
    assert kept(truncate(logits, SamplingParams(top_p=0.4))) == [True, False, False, False]
    assert kept(truncate(logits, SamplingParams())) == [True] * 4


def test_seeded_n_samples_and_stop_tokens(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, stop_token_ids=(3, 4), seed=5)
    a = engine.generate(PROMPTS, MASK, sp)
    b = engine.generate(PROMPTS, MASK, sp)
    c = engine.generate(PROMPTS, MASK, SamplingParams(temperature=1.0, max_new_tokens=8, n=4,
                                                      stop_token_ids=(3, 4), seed=6))
    assert a.response_ids.shape[0] == 12
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.response_ids, c.response_ids)
    for ids, m, reason in zip(a.response_ids, a.response_mask, a.finish_reason):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()          # mask is a prefix
        assert (ids[n:] == 0).all()                      # padding after the end
        stopped = int(ids[n - 1]) in (3, 4)
        assert reason == ("stop" if stopped else "length")
        assert not any(int(t) in (3, 4) for t in ids[:n - 1])  # nothing generated past a stop
        if not stopped:
            assert n == 8


def test_greedy_is_argmax_and_ignores_seed(engine):
    g1 = engine.generate(PROMPTS, MASK, SamplingParams(temperature=0, max_new_tokens=4, seed=1))
    g2 = engine.generate(PROMPTS, MASK, SamplingParams(temperature=0, max_new_tokens=4, seed=2))
    assert torch.equal(g1.response_ids, g2.response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logp_matches_actor_recomputation(engine, temperature):
    """KV-cached sampling and a full forward agree on log softmax(logits / T) of each token."""
    sp = SamplingParams(temperature=temperature, max_new_tokens=6, n=2, stop_token_ids=(3,), seed=0)
    out = engine.generate(PROMPTS, MASK, sp)
    batch = Batch(prompt_ids=PROMPTS.repeat_interleave(2, 0), prompt_mask=MASK.repeat_interleave(2, 0),
                  response_ids=out.response_ids, response_mask=out.response_mask)
    logp, _ = token_logprobs(engine.model, batch, temperature=temperature)
    m = out.response_mask.bool()
    torch.testing.assert_close(out.logp[m], logp[m], rtol=1e-4, atol=1e-5)
    assert (out.logp[m] <= 0).all() and math.isfinite(float(out.logp.sum()))


def test_load_weights_checks_names_and_shapes(engine):
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("nope.weight", torch.zeros(1))])
    name, w = next(iter(engine.named_weights()))
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(name, torch.zeros(1))])
    assert engine.load_weights([(name, w.clone())]) == w.numel() * 4


def static_engine(**opts):
    from roles.rollout.torch_engine import TorchEngineConfig
    return TorchEngine(build_model(tiny_model_config(), seed=0), pad_token_id=0,
                       device=torch.device("cpu"), options=TorchEngineConfig(**opts))


CASES = [SamplingParams(temperature=1.0, top_k=8, top_p=0.9, max_new_tokens=7, n=3, stop_token_ids=(1,), seed=4),
         SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=(1,)),
         SamplingParams(temperature=0.7, max_new_tokens=7, n=3, stop_token_ids=(1,), seed=9)]


def assert_same_generation(a, b):
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-5, atol=1e-5)
    assert a.finish_reason == b.finish_reason


def test_static_kv_cache_generates_what_the_growing_cache_does(engine):
    """Same tokens, masks and log-probs; the cache is kept between calls of one shape (and
    reset), replaced for a new shape, and dropped by sleep()."""
    static = static_engine(static_cache=True, cache_len_multiple=8)
    assert static.static and not engine.static  # CPU default: growing cache
    for sampling in CASES:
        assert_same_generation(static.generate(PROMPTS, MASK, sampling),
                               engine.generate(PROMPTS, MASK, sampling))
    assert static._cache[0] == (9, 16)  # 3 prompts x n=3; 5 + 7 tokens rounded up to 16
    static.sleep()
    assert static._cache is None


@pytest.mark.slow
def test_compiled_decode_generates_what_eager_does(engine):
    compiled = static_engine(compile=True)
    for sampling in CASES[:2]:
        assert_same_generation(compiled.generate(PROMPTS, MASK, sampling),
                               engine.generate(PROMPTS, MASK, sampling))


# --- requests, continuous batching, pausing ---------------------------------------------------

from roles.rollout.engine import Request, request_seed  # noqa: E402
from roles.rollout.sampling import uniforms  # noqa: E402
from roles.rollout.torch_engine import TorchEngineConfig  # noqa: E402

UNEVEN = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(3, 4))


def _requests(n: int, sampling: SamplingParams = UNEVEN, seed: int = 11) -> list[Request]:
    prompts = [(5, 6, 7), (3, 4, 5, 6, 7), (9, 8), (7,), (8, 9, 10, 11, 12, 13)]
    return [Request(prompt=prompts[i % len(prompts)], sampling=sampling.with_seed(request_seed(seed, i)))
            for i in range(n)]


def _engine(**opts) -> TorchEngine:
    return TorchEngine(build_model(tiny_model_config(), seed=0), pad_token_id=0, device=torch.device("cpu"),
                       options=TorchEngineConfig(**opts))


def test_a_requests_tokens_do_not_depend_on_the_batch_or_the_scheduler():
    """Per-request seeds: alone, in a batch of 20, with 3 rows running at a time (finished rows
    leave, waiting ones join), or in lockstep on a static cache: the same tokens and log-probs."""
    reqs = _requests(20)
    full = _engine().generate_requests(reqs)
    few = _engine(max_running=3).generate_requests(reqs)
    static = _engine(static_cache=True).generate_requests(reqs)
    alone = [_engine().generate_requests([r])[0] for r in reqs[:5]]
    lengths = {len(c.tokens) for c in full}
    assert len(lengths) > 3, lengths  # uneven: stop tokens end some early
    for other in (few, static, alone):
        for a, b in zip(full, other):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
            assert a.logp == pytest.approx(b.logp, abs=1e-5)


def test_continuous_batching_computes_only_the_tokens_it_produces():
    engine = _engine(max_running=4)
    out = engine.generate_requests(_requests(40))
    produced = sum(len(c.tokens) for c in out)
    assert engine.last_stats["tokens"] == produced
    # finished rows leave: at most an eighth of the running rows (rounded up) idles per step
    assert engine.last_stats["useful_frac"] > 0.7
    lockstep = _engine(static_cache=True)
    lockstep.generate_requests(_requests(40))
    assert lockstep.last_stats["useful_frac"] < engine.last_stats["useful_frac"]


def test_a_paused_request_continues_where_it_stopped():
    """Pause after 3 completions: the rest come back "paused" with their tokens; continuing them
    with prefix = those tokens gives exactly what an uninterrupted call gives."""
    reqs = _requests(12)
    whole = _engine().generate_requests(reqs)
    engine = _engine(max_running=4)
    first = engine.generate_requests(reqs, pause=lambda done: len(done) >= 3)
    assert sum(c.finish_reason != "paused" for c in first) >= 3
    assert any(c.finish_reason == "paused" for c in first)
    again = [Request(prompt=r.prompt, sampling=r.sampling, prefix=c.tokens)
             for r, c in zip(reqs, first) if c.finish_reason == "paused"]
    rest = iter(engine.generate_requests(again))
    for w, f in zip(whole, first):
        got = f if f.finish_reason != "paused" else (lambda c: type(c)(f.tokens + c.tokens, f.logp + c.logp,
                                                                       c.finish_reason))(next(rest))
        assert got.tokens == w.tokens and got.finish_reason == w.finish_reason
        assert got.logp == pytest.approx(w.logp, abs=1e-5)


def test_a_prefix_counts_toward_the_budget():
    r = Request(prompt=(5, 6), sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=3), prefix=(7, 8, 9))
    out = _engine().generate_requests([r])[0]
    assert len(out.tokens) <= 3 and (out.finish_reason == "stop" or len(out.tokens) == 3)
    with pytest.raises(ValueError, match="leaves nothing"):
        Request(prompt=(5,), sampling=SamplingParams(max_new_tokens=2), prefix=(1, 2))


def test_the_per_request_generator_is_uniform():
    """U(seed, t) over 100k (seed, t) pairs: the mean, the variance and ten equal bins are those
    of a uniform distribution (deterministic: the inputs are fixed)."""
    seeds = torch.arange(1000).repeat_interleave(100)
    steps = torch.arange(100).repeat(1000)
    u = uniforms(seeds, steps)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, abs=0.002)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert ((counts - 10_000).abs() < 400).all(), counts
    assert not torch.equal(uniforms(seeds, steps), uniforms(seeds + 1, steps))
