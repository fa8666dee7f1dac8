"""Evaluation: pass@k / avg@k / maj@k definitions, launch.eval end to end on 2 processes, and a
scripted engine that always answers correctly scoring 1.0 everywhere (extraction + grading)."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launch.evaluate import REANSWER, avg_at_k, maj_at_k, pass_at_k, summarize
from roles.rollout.engine import ENGINES, Engine, EngineConfig, EngineContext, Generation, register_engine
from tests.dist_utils import run_distributed
from tests.test_train_e2e import ROOT, torchrun


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_exact_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            exact = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_avg_and_maj_at_k_with_deterministic_ties():
    correct = [False, True, True, False]
    assert avg_at_k(correct, 2) == 0.5 and avg_at_k(correct, 4) == 0.5
    # "a" and "b" tie 2-2: the answer seen first ("a", wrong) wins
    assert maj_at_k(["a", "b", "b", "a"], correct, 4) == 0.0
    assert maj_at_k(["b", "a", "a", "b"], [True, False, False, True], 4) == 1.0
    # samples without an answer do not vote; nobody voting scores 0
    assert maj_at_k([None, "b", None, None], correct, 4) == 1.0
    assert maj_at_k([None, None], [True, True], 2) == 0.0
    assert maj_at_k(["a", "b", "b"], [True, False, False], 1) == 1.0


def _summary_from_samples(path: Path, ks: list[int]) -> dict:
    from launch.evaluate import Sample
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return summarize([Sample(**r) for r in rows], ks)


EVAL = ["data.max_prompt_len=4096", "data.format.chat_template=false", "data.task.train_size=500",
        "eval.benchmarks=[aime24,math500]", "eval.n=2", "eval.k=[1,2]", "eval.rounds=2"]


@pytest.mark.dist
def test_launch_eval_on_aime24_and_math500_with_a_tiny_model(tmp_path):
    """The quickstart's tiny model, sampled (temperature 1), 2 processes, 2 rounds."""
    out = tmp_path / "run"
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", *EVAL, "eval.temperature=1.0",
             "eval.max_new_tokens=6", module="launch.eval")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary) == {"aime24", "aime24/round_2", "math500", "math500/round_2"}
    assert summary["aime24"]["n_problems"] == 30 and summary["math500"]["n_problems"] == 500
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == (30 + 500) * 2 * 2
    assert set(rows[0]) == {"benchmark", "problem_id", "sample", "round", "response", "answer", "correct"}
    assert len({(r["benchmark"], r["problem_id"]) for r in rows}) == 530  # every problem, once per id
    assert _summary_from_samples(out / "eval" / "samples.jsonl", [1, 2]) == summary


def scripted_eval(out: str, tok_dir: str) -> dict:
    from transformers import AutoTokenizer
    from core.data import PromptFormat, read_prompts
    from launch.eval import main
    raw = PromptFormat(chat_template=False, instruction="")
    for name in ("aime24", "math500"):
        SCRIPT.update({r.problem: r.answer for r in read_prompts(ROOT / "data" / f"{name}.jsonl", raw)})
    TOKENIZER["tok"] = AutoTokenizer.from_pretrained(tok_dir)
    return main(["--config", str(ROOT / "configs" / "quickstart.yaml"), f"run.output_dir={out}", *EVAL,
                 "eval.temperature=1.0", "rollout.engine=scripted", "model.path=null",
                 f"model.tokenizer={tok_dir}", "model.config={model_type: qwen2, hidden_size: 16, "
                 "intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"])


@pytest.mark.dist
def test_a_model_that_always_answers_correctly_scores_one_everywhere(tmp_path):
    """Checks extraction and grading on every problem of aime24 and math500, not the model."""
    from core.data import PromptFormat, read_prompts
    from launch.tasks import char_tokenizer
    raw = PromptFormat(chat_template=False, instruction="")
    rows = [r for n in ("aime24", "math500") for r in read_prompts(ROOT / "data" / f"{n}.jsonl", raw)]
    text = "".join(r.problem + str(r.answer) for r in rows) + PromptFormat().instruction + REANSWER
    char_tokenizer("".join(sorted(set(text + "The answer is \\boxed{}")))).save_pretrained(tmp_path / "tok")
    summary = run_distributed(scripted_eval, str(tmp_path / "run"), str(tmp_path / "tok"), world_size=2)[0]
    for bench, table in summary.items():
        for metric, value in table.items():
            if metric != "n_problems":
                assert value == 1.0, (bench, metric)
SCRIPT: dict[str, str] = {}
"""problem text -> its answer, for the scripted engine below."""
TOKENIZER = {}

class ScriptedEngine(Engine):
    """Answers every problem it recognises in the prompt with `\\boxed{<the answer>}`."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def generate(self, prompt_ids, prompt_mask, sampling) -> Generation:
        tok = TOKENIZER["tok"]
        texts = [tok.decode(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        replies = [f"The answer is \\boxed{{{SCRIPT[max((p for p in SCRIPT if t.startswith(p)), key=len)]}}}"
                   for t in texts for _ in range(sampling.n)]
        seqs = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in replies]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return Generation(ids, mask, torch.zeros(ids.shape), ["stop"] * len(seqs))

    def load_weights(self, named_tensors):
        return sum(t.numel() * t.element_size() for _, t in named_tensors)


if "scripted" not in ENGINES:
    @register_engine("scripted")
    @dataclass(kw_only=True, slots=True)
    class ScriptedEngineConfig(EngineConfig):
        """A user engine: its Config registers under a name and builds it."""
        name: str = "scripted"

        def build(self, ctx: EngineContext) -> Engine:
            return ScriptedEngine(ctx.pad_token_id)


@pytest.mark.dist
def test_benchmarks_are_evaluated_during_training(tmp_path):
    """eval.benchmarks during launch.train: eval/<set>/<metric> at step 0, every eval.every
    steps and at the end, in metrics.jsonl and in MLflow."""
    out = tmp_path / "run"
    torchrun("configs/quickstart.yaml", f"run.output_dir={out}", "run.steps=2", "eval.every=0",
             "data.prompts_per_step=8", "rollout.n=2", "data.task.train_size=500",
             "data.task.eval_size=20", "data.max_prompt_len=4096", "data.format.chat_template=false",
             "eval.benchmarks=[amc23]", "eval.n=2", "eval.k=[1,2]", "eval.max_new_tokens=4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/amc23/pass@2" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert {"eval/amc23/pass@1", "eval/amc23/avg@2", "eval/amc23/maj@2", "eval/accuracy"} <= set(r)
        assert r["eval/amc23/n_problems"] == 40
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    # MLflow keys cannot hold "@": pass@1 is logged as pass_1 there
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/amc23/pass_1")] == [0, 2]
