"""Curricula: stage levels by length and by measured difficulty, the pass-rate tracker, and a
run whose stage changes at the configured steps (visible in metrics.jsonl)."""
from __future__ import annotations

import pytest
import torch

from core.curriculum import CurriculumConfig, PassRateTracker, difficulty_levels, length_levels
from core.data import PromptDataset, PromptRow
from launch.tasks import char_tokenizer
from tests.test_train_e2e import read_metrics, torchrun


def test_length_levels_short_first_and_cumulative():
    rows = [PromptRow("1" * n + "=", "0", "addition") for n in (5, 1, 3, 2, 4, 6)]
    ds = PromptDataset(rows, char_tokenizer(), max_prompt_len=16)
    # token lengths (with "="): 6, 2, 4, 3, 5, 7
    assert length_levels(ds, 3, cumulative=False) == [[1, 3], [2, 4], [0, 5]]
    assert length_levels(ds, 3, cumulative=True) == [[1, 3], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]


def test_difficulty_levels_drop_solved_and_unsolved_easy_first():
    rates = [1.0, 0.25, 0.0, 0.75, 0.5, -1.0, 0.875]
    assert difficulty_levels(rates, 2) == [[3, 6], [1, 4]]
    with pytest.raises(ValueError, match="0 < pass rate < 1"):
        difficulty_levels([0.0, 1.0, 0.5], 2)


def test_bad_boundaries_are_rejected():
    with pytest.raises(ValueError, match="boundaries"):
        CurriculumConfig(kind="length", stages=3, boundaries=[5])


def test_pass_rate_tracker():
    t = PassRateTracker()
    t.update(torch.tensor([7, 7, 7, 7, 9, 9]), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    t.update(torch.tensor([7, 7]), torch.tensor([1.0, 1.0]))
    assert t.pass_rate(7) == pytest.approx(5 / 6) and t.pass_rate(9) == 0.0 and t.pass_rate(3) is None
    m = t.metrics()
    assert m["curriculum/problems_seen"] == 2 and m["curriculum/never_solved_frac"] == 0.5
    u = PassRateTracker()
    u.load_state_dict(t.state_dict())
    assert u.pass_rate(7) == t.pass_rate(7)


SMALL = ["run.steps=5", "data.prompts_per_step=8", "rollout.n=4", "eval.every=0",
         "data.task.eval_size=20", "data.task.train_size=600"]


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["length", "difficulty"])
def test_stage_changes_at_configured_steps(tmp_path, kind):
    out = tmp_path / kind
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *SMALL, f"data.curriculum.kind={kind}",
             "data.curriculum.stages=3", "data.curriculum.boundaries=[2,4]",
             "data.curriculum.max_new_tokens=[6,7,8]", "data.curriculum.probe_n=4")
    rows = [r for r in read_metrics(out) if r["step"] > 0]
    assert [r["curriculum/stage"] for r in rows] == [0, 0, 1, 1, 2]
    assert [r["curriculum/max_new_tokens"] for r in rows] == [6, 6, 7, 7, 8]
    assert rows[-1]["curriculum/problems_seen"] > 0
