"""DAPO's dynamic sampling on 2 gloo ranks with the real torch engine and a real scorer that
makes some groups uniform: the trained batch holds only informative groups, has the target size
on every rank, and the number of generation rounds is reported."""
from __future__ import annotations

import pytest
import torch

from roles.reward.scorers import SCORERS, register_scorer
from tests.dist_utils import run_distributed
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.dist

GROUPS_PER_RANK, N = 4, 8

if "uniform_or_parity" not in SCORERS:
    @register_scorer("uniform_or_parity")
    def uniform_or_parity(response: str, ground_truth: str) -> float:
        """'uniform' prompts: always 1 (a group with no signal); 'mixed': parity of the text."""
        return 1.0 if ground_truth == "uniform" else float(sum(map(ord, response)) % 2)


def prompt_batches(rank: int, uniform_batches: int):
    """Rank 0's first `uniform_batches` batches are all uniform; everything else is mixed."""
    from core.data import PromptRow, collate_prompts
    from launch.tasks import char_tokenizer
    tok = char_tokenizer()
    k = 0
    while True:
        kind = "uniform" if rank == 0 and k < uniform_batches else "mixed"
        rows = [PromptRow(f"{rank}{k}{i}+1=", kind, "uniform_or_parity") for i in range(GROUPS_PER_RANK)]
        items = [(100 * rank + 10 * k + i, tok.encode(r.prompt), r) for i, r in enumerate(rows)]
        yield collate_prompts(items, pad_id=tok.pad_token_id)
        k += 1


def sample(max_rounds: int, uniform_batches: int) -> dict:
    from algorithms.dapo import dynamic_sample, informative
    from core import dist
    from core.models import build_model
    from launch.tasks import char_tokenizer
    from roles.reward import Reward
    from roles.rollout import Rollout
    rank = dist.info().rank
    tok = char_tokenizer()
    rollout = Rollout.build(Rollout.Config(n=N, max_new_tokens=6, temperature=1.0),
                            policy=lambda: build_model(tiny_model_config(vocab_size=len(tok)), seed=0), tokenizer=tok,
                            device=torch.device("cpu"), seed=0, rank=rank, dtype=torch.float32)
    stream = prompt_batches(rank, uniform_batches)
    out = dynamic_sample(next(stream), rollout=rollout, reward=Reward(Reward.Config()), prompts=stream,
                         max_rounds=max_rounds)
    b = out.value
    return {"n": len(b), "informative": informative(b.scores, b.group_ids).tolist(),
            "group_ids": b.group_ids.tolist(), "truth": b.ground_truth, "prompts": b.prompt_text,
            "metrics": dict(out.metrics), "fields": sorted(b.fields)}


def test_only_informative_groups_of_target_size_move_across_ranks():
    r0, r1 = run_distributed(sample, 4, 2, world_size=2)
    for r in (r0, r1):
        assert r["n"] == GROUPS_PER_RANK * N                       # the target, on every rank
        assert all(r["informative"])                                 # no uniform group trained on
        assert r["metrics"]["dynamic_sampling/rounds"] == 2          # rank 0 had nothing at first
        assert r["metrics"]["dynamic_sampling/filled_uniform_groups"] == 0
        assert len(set(r["group_ids"])) == GROUPS_PER_RANK  # ids unique per group on the rank
        assert all(r["group_ids"].count(g) == N for g in set(r["group_ids"]))
        assert "scores" in r["fields"] and "response_ids" in r["fields"]
    # rank 0 produced no informative group: its whole batch came from rank 1
    assert set(r0["truth"]) == {"mixed"} and all(p.startswith("1") for p in r0["prompts"])
    assert not set(r0["prompts"]) & set(r1["prompts"])


def test_round_cap_fills_with_uniform_groups_and_says_so():
    r0, r1 = run_distributed(sample, 1, 2, world_size=2)
    assert r0["n"] == r1["n"] == GROUPS_PER_RANK * N
    assert r0["metrics"]["dynamic_sampling/rounds"] == 1
    filled = r0["metrics"]["dynamic_sampling/filled_uniform_groups"]
    kept = (sum(r0["informative"]) + sum(r1["informative"])) // N
    assert filled > 0 and filled == 2 * GROUPS_PER_RANK - kept  # the gap, filled and counted
