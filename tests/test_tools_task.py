"""The built-in `multiplication` task (launch/tasks.py), its scorer and checkpoint, and the tools
quickstart (configs/quickstart-tools.yaml): a small model learns to call a calculator."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from algorithms.base import ALGORITHMS
from launch.tasks import ALPHABET, MultiplicationConfig, build_task, char_tokenizer, task_tokenizer
from roles.reward.scorers import get_scorer
from tests.test_train_e2e import ROOT, check_tools_curves, read_metrics, torchrun

ASSET = ROOT / "assets" / "quickstart-tools-sft"
score = get_scorer("multiplication")


def test_rows_are_three_digit_products_with_a_disjoint_held_out_split():
    task = build_task(MultiplicationConfig(eval_size=200, train_size=5000))
    for row in task.train[:50] + task.eval[:50]:
        a, b = (int(x) for x in row.prompt.rstrip("=").split("*"))
        assert 100 <= a <= 999 and 100 <= b <= 999 and row.answer == str(a * b)
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.eval}
    with pytest.raises(ValueError, match="exceed"):
        MultiplicationConfig(digits=1, eval_size=50, train_size=60).rows()


def test_the_teacher_calls_the_calculator_at_its_rate_and_copies_the_answer():
    cfg = MultiplicationConfig(teacher_call=0.2)
    rng = random.Random(0)
    answers = [cfg.teacher_answer("123*456=", rng) for _ in range(2000)]
    calls = [a for a in answers if a.startswith("[")]
    assert set(calls) == {"[123*456]{56088}56088"} and set(answers) - set(calls) == {"56088"}
    assert abs(len(calls) / 2000 - 0.2) < 0.03
    assert all(score(a, "56088") == 1.0 for a in answers)


def test_the_answer_is_what_follows_the_last_observation():
    assert score("[123*456]{56088}56088", "56088") == 1.0
    assert score("56088", "56088") == 1.0
    assert score("[123*456]{56088}", "56088") == 0.0  # the observation alone is not an answer
    assert score("[123*456]{56088}56087", "56088") == 0.0
    assert score("{56088}56088}", "56088") == 0.0
    with pytest.raises(ValueError, match="ASCII digits"):
        score("1", "1.0")


def test_the_checkpoint_is_the_tasks_and_its_command_is_recorded():
    tok = task_tokenizer(MultiplicationConfig())
    assert len(tok) == 24 and all(tok.get_vocab()[ch] == char_tokenizer().get_vocab()[ch] for ch in ALPHABET)
    assert AutoTokenizer.from_pretrained(ASSET, local_files_only=True).get_vocab() == tok.get_vocab()
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 4_000_000
    command = "torchrun --nproc_per_node=2 -m launch.sft --config configs/quickstart-tools-sft.yaml"
    assert command in (ASSET / "README.md").read_text()
    assert command in (ROOT / "configs" / "quickstart-tools-sft.yaml").read_text()
    assert json.loads((ASSET / "config.json").read_text())["vocab_size"] == 24


@pytest.mark.slow
@pytest.mark.dist
def test_tools_quickstart_learns_to_call_the_calculator(tmp_path):
    """README's tools command, exactly as shipped (30 steps, 2 processes): held-out greedy
    accuracy from <= 0.15 to >= 0.7, the policy calling the calculator on most samples, and
    the curves in MLflow.

    Measured (2026-12-01, 2 CPU processes under load): 0.016 -> 0.992 after 10 steps, 0.998 at
    30, ~80 s; calls per sample 0.16 at step 1 -> ~1.0. The thresholds are the issue's; the
    margin (0.3 above 0.7 at the end) is far outside a seed's or a release's spread."""
    out = tmp_path / "tools"
    torchrun("configs/quickstart-tools.yaml", f"run.output_dir={out}")
    rows = read_metrics(out)
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert evals[0] <= 0.15 and evals[-1] >= 0.7, evals
    train = [r for r in rows if "tools/calls_per_sample" in r]
    assert train[0]["tools/calls_per_sample"] < 0.5 < train[-1]["tools/calls_per_sample"]
    assert all(r["tools/error_rate"] <= 0.1 for r in train[-5:])
    check_tools_curves(out, len(evals))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.breadth
@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_every_algorithm_runs_the_tools_quickstart(tmp_path, name):
    from tests.test_algorithms_e2e import EXTRA
    out = tmp_path / name
    extra = [e for e in EXTRA.get(name, []) if "reference.model_path" not in e]  # opd's teacher: the long one
    if name == "opd":
        extra.append(f"reference.model_path={ASSET}")
    torchrun("configs/quickstart-tools.yaml", f"run.output_dir={out}", f"algorithm.name={name}", "run.steps=3",
             "data.prompts_per_step=8", "rollout.n=4", "eval.every=0", "data.task.eval_size=40",
             "tracking.enabled=false", "checkpoint.export_hf=false", *extra)
    train = [r for r in read_metrics(out) if "stage" not in r and r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite metrics at step {r['step']}: {bad}"
        assert "tools/calls_per_sample" in r


def test_tools_quickstart_config_names_its_checkpoint():
    text = (ROOT / "configs" / "quickstart-tools.yaml").read_text()
    assert "assets/quickstart-tools-sft" in text and "tools: {names: [calculator], format: plain" in text
    assert Path(ASSET / "model.safetensors").exists()
