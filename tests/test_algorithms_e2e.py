"""Each of the eight algorithms runs 3 steps on the quickstart task with 2 processes."""
from __future__ import annotations

import math

import pytest

from tests.test_train_e2e import read_metrics, torchrun

pytestmark = pytest.mark.dist

CRITIC = {"ppo", "orz", "vapo"}
SMALL = ["run.steps=3", "data.prompts_per_step=8", "rollout.n=4", "eval.every=0",
         "data.task.eval_size=40", "data.task.train_size=2000", "algorithm.vapo.value_pretrain_steps=2"]


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "dapo", "ppo", "orz", "vapo", "reinforce_pp", "rloo"])
def test_algorithm_runs_three_steps_on_two_ranks(tmp_path, name):
    out = tmp_path / name
    proc = torchrun("configs/quickstart.yaml", f"run.output_dir={out}", f"algorithm.name={name}", *SMALL)
    rows = read_metrics(out)
    train = [r for r in rows if "stage" not in r]
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite metrics at step {r['step']}: {bad}"
    built = next(line for line in proc.stdout.splitlines() if "built roles:" in line)
    assert ("critic" in built) == (name in CRITIC), built
    assert ("critic/vf_loss" in train[1]) == (name in CRITIC)
    assert "actor/pg_loss" in train[1] and "reward/mean" in train[1]
    if name == "vapo":
        assert [r["stage_step"] for r in rows if r.get("stage") == "value_pretrain"] == [1, 2]
    if name == "dapo":
        assert train[1]["dynamic_sampling/rounds"] >= 1
    if name == "reinforce_pp":  # k1 KL in the reward needs the reference
        assert "reference" in built
