"""Off-policy steps as a property of any graph (algorithms/off_policy.py) and the rollout
buffer (roles/rollout/buffer.py): K = 0 is the synchronous run bit for bit; K > 0 corrects the
objective, carries samples between steps, bounds their staleness, and resumes exactly."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.base import OffPolicy
from algorithms.grpo import GRPOConfig, build_graph
from algorithms.off_policy import rewrite
from core.batch import Batch
from core.data import PROMPT_FIELDS
from core.graph import GraphError, Plan
from roles.rollout.buffer import RolloutBuffer
from roles.rollout.engine import Completion, Request, SamplingParams
from tests.test_train_e2e import read_metrics, torchrun

SMALL = ["run.steps=4", "data.prompts_per_step=16", "rollout.n=4", "eval.every=2", "data.task.eval_size=40",
         "data.task.train_size=2000", "tracking.enabled=false", "checkpoint.export_hf=false"]
WALL_CLOCK = ("timing_s/", "perf/tokens_per_s", "reshard/seconds", "reshard/gbps")


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows]


# --- the rewrite ------------------------------------------------------------------------------

def test_staleness_zero_leaves_the_plan_as_built():
    plan = Plan(train=build_graph(GRPOConfig()))
    assert rewrite(plan, OffPolicy(max_staleness=0)) is plan


def test_staleness_k_adds_the_importance_correction_to_the_update():
    graph = rewrite(Plan(train=build_graph(GRPOConfig())), OffPolicy(max_staleness=2, is_cap=3.0)).train
    names = [n.name for n in graph.nodes]
    assert names.index("rollout_correction") < names.index("update_actor")
    update = next(n for n in graph.nodes if n.name == "update_actor")
    assert "rollout_is_weights" in update.inputs
    correction = next(n for n in graph.nodes if n.name == "rollout_correction")
    assert correction.kwargs["cfg"].is_level == "token" and correction.kwargs["cfg"].is_cap == 3.0
    graph.validate(PROMPT_FIELDS)


def test_a_plain_rollout_generate_node_gets_the_prompt_stream():
    from core.graph import Graph, Node
    user = Graph("user", [Node("generate", "rollout.generate", PROMPT_FIELDS, ("response_ids",))])
    node = rewrite(Plan(train=user), OffPolicy(max_staleness=1)).train.nodes[0]
    assert node.needs == ("rollout", "prompts") and node.batch_in


def test_off_policy_needs_the_proximal_policy_recomputed():
    with pytest.raises(GraphError, match="need old_logp recomputed"):
        rewrite(Plan(train=build_graph(GRPOConfig(recompute_old_logp=False))), OffPolicy(max_staleness=1))


# --- the buffer -------------------------------------------------------------------------------

class ScriptedEngine:
    """Generates `length[prompt[0]]` tokens per request, one per call if pausing, recording calls."""

    def __init__(self, lengths: dict[int, int]) -> None:
        self.lengths, self.calls = lengths, []

    def generate_requests(self, requests: list[Request], *, pause=None) -> list[Completion]:
        self.calls.append(len(requests))
        out, done = [], []
        for i, r in enumerate(requests):
            left = self.lengths[r.prompt[0]] - len(r.prefix)
            if pause is not None and left > 1:  # one token per call: long ones pause
                out.append(Completion((7,), (-0.5,), "paused"))
            else:
                out.append(Completion((7,) * (left - 1) + (1,), (-0.5,) * left, "stop"))
                done.append(i)
        return out


def prompts(first: int, count: int) -> Batch:
    ids = torch.arange(first, first + count)[:, None]
    return Batch(prompt_ids=ids, prompt_mask=torch.ones_like(ids), group_ids=ids[:, 0],
                 ground_truth=[""] * count, data_source=["x"] * count, prompt_text=[""] * count)


def test_the_buffer_carries_long_samples_and_bounds_their_staleness():
    """Prompts 0-3 need 1 token, 10-13 need 3: with K = 1, step 1 takes the short groups and
    carries the long ones, which finish at step 2 from their prefix with tokens of two versions;
    with K = 0 (synchronous) nothing would carry."""
    engine = ScriptedEngine({**{i: 1 for i in range(4)}, **{i: 3 for i in range(10, 14)}, **{i: 9 for i in range(20, 24)}})
    buffer = RolloutBuffer(max_staleness=1, partial_rollouts=True, in_flight=2.0, stale="drop", n=2, pad_token_id=0)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    stream = iter([prompts(10, 4)])
    rows, done, metrics, counts = buffer.generate(engine, prompts(0, 4), sampling, version=1, prompts=stream)
    assert rows.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and all(c.finish_reason == "stop" for c in done)
    assert counts["off_policy/carried_responses"] == 8 and metrics["off_policy/staleness_max"] == 0
    rows, done, metrics, counts = buffer.generate(engine, prompts(20, 4), sampling, version=2, prompts=iter([]))
    assert sorted(set(rows.group_ids.tolist())) == [10, 11, 12, 13]
    assert all(len(c.tokens) == 3 and c.tokens[-1] == 1 for c in done)  # prefix + the rest
    assert metrics["off_policy/staleness_max"] == 1 and metrics["off_policy/staleness_mean"] == 1
    # what is still in flight (prompts 20-23, started at version 2) is 2 versions behind at 4:
    # over the bound, dropped with its groups (the state round-trips through a checkpoint)
    later = RolloutBuffer(max_staleness=1, partial_rollouts=True, in_flight=1.0, stale="drop", n=2, pad_token_id=0)
    later.load_state_dict(buffer.state_dict())
    started = [g for g in later.groups if any(s.versions for s in g.samples)]
    assert started and later._enforce_staleness(version=4) == (len(started), 0)
    assert all(not any(s.versions for s in g.samples) for g in later.groups)


def test_regenerate_restarts_stale_samples_from_their_prompt():
    engine = ScriptedEngine({i: 3 for i in range(8)})
    buffer = RolloutBuffer(max_staleness=1, partial_rollouts=True, in_flight=2.0, stale="regenerate", n=1,
                           pad_token_id=0)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    buffer._add(prompts(0, 4), sampling)
    buffer._run(engine, sampling, version=1, need=4)  # everyone paused after one token
    assert all(s.tokens == [7] for g in buffer.groups for s in g.samples)
    assert buffer._enforce_staleness(version=3) == (0, 4)
    assert all(s.tokens == [] and s.finish is None for g in buffer.groups for s in g.samples)


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.dist
def test_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path):
    """K = 0 and no partial rollouts, given explicitly, against the default (synchronous) run:
    every non-timing number of metrics.jsonl equal."""
    a, b = tmp_path / "default", tmp_path / "k0"
    torchrun("configs/quickstart.yaml", f"run.output_dir={a}", *SMALL)
    torchrun("configs/quickstart.yaml", f"run.output_dir={b}", *SMALL, "algorithm.off_policy.max_staleness=0",
             "algorithm.off_policy.partial_rollouts=false")
    assert numbers(read_metrics(a)) == numbers(read_metrics(b))


@pytest.mark.dist
def test_a_resume_with_carried_responses_is_exact(tmp_path):
    """K = 1 on 2 ranks: 4 steps straight equal 2 steps, a checkpoint holding carried samples,
    and 2 more after a resume."""
    common = [*SMALL, "algorithm.off_policy.max_staleness=1", "rollout.max_new_tokens=8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun("configs/quickstart.yaml", f"run.output_dir={straight}", *common)
    torchrun("configs/quickstart.yaml", f"run.output_dir={resumed}", *common, "run.stop_after=2")
    carried = torch.load(resumed / "checkpoints" / "step_000002" / "rank_0.pt", weights_only=True)
    assert carried["roles"]["rollout"]["buffer"]["groups"], "the checkpoint carries in-flight groups"
    torchrun("configs/quickstart.yaml", f"run.output_dir={resumed}", *common)
    want, got = numbers(read_metrics(straight)), numbers(read_metrics(resumed))
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert got == want
    assert any(r.get("off_policy/staleness_max", 0) > 0 for r in want)
    assert all(math.isfinite(v) for r in want for v in r.values() if isinstance(v, float))
