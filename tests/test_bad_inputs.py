"""Issue #14's table, row by row (the checkpoint rows are in tests/test_checkpoint_faults.py, the
sleeping scorer in tests/test_reward.py): bad values, bad data and bad weights give a clear
error naming what is wrong, or are replaced and counted; nothing trains on non-finite values
silently."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import load_config
from core.data import PromptFormat, read_prompts
from core.models import ModelConfig, build_model, load_tokenizer
from core.optim import NonFiniteError, OptimConfig, TrainState
from launch.config import JobConfig
from launch.runlog import RunLog, read_rows
from roles.reward import Reward
from roles.reward.role import has_scorer
from roles.reward.scorers import SCORERS, math_answer_tag_scorer, register_scorer
from tests.test_train_e2e import ROOT

RAW = PromptFormat(chat_template=False, instruction="", data_source="math")
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# --- values out of range ----------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("reward.timeout_s=-1", "reward.timeout_s"), ("run.steps=-1", "run.steps"), ("run.steps=0", "run.steps"),
    ("actor.mini_batches=0", "actor.mini_batches"), ("actor.lr=-1e-6", "actor.lr"),
    ("actor.micro_batch_size=0", "actor.micro_batch_size"), ("actor.betas=[0.9,1.5]", "actor.betas"),
    ("actor.min_lr_ratio=2", "actor.min_lr_ratio"), ("critic.epochs=0", "critic.epochs"),
    ("rollout.n=0", "rollout.n"), ("rollout.top_p=0", "rollout.top_p"), ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"), ("data.prompts_per_step=0", "data.prompts_per_step"),
    ("eval.n=0", "eval.n"), ("eval.k=[1,4]", "eval.k"), ("reward.workers=-2", "reward.workers"),
    ("hybrid.bucket_mb=0", "hybrid.bucket_mb"), ("reference.ema_decay=1.0", "reference.ema_decay"),
    ("algorithm.rewards.overlong_buffer_frac=-0.1", "algorithm.rewards.overlong_buffer_frac"),
    ("reward.sandbox.wall_seconds=0", "reward.sandbox.wall_seconds"),
])
def test_out_of_range_values_fail_at_load_naming_key_and_range(override, key):
    with pytest.raises(ValueError, match=rf"config key '{key}' must be .+, got .+ \(in .*quickstart.yaml"):
        load_config(JobConfig, QUICKSTART, [override])


def test_ranges_of_a_slot_variant_are_checked_too():
    with pytest.raises(ValueError, match=r"config key 'algorithm.gamma' must be in \[0, 1\], got 1.5"):
        load_config(JobConfig, QUICKSTART, ["algorithm.name=ppo", "algorithm.gamma=1.5"])
    with pytest.raises(ValueError, match=r"config key 'rollout.engine.tp_size' must be >= 1, got 0"):
        load_config(JobConfig, QUICKSTART, ["rollout.engine=sglang", "rollout.engine.tp_size=0"])


# --- updates that would corrupt the weights --------------------------------------------------

def _train_state(lr: float, max_bad_steps: int = 3) -> TrainState:
    torch.manual_seed(0)
    return TrainState(torch.nn.Linear(4, 2), OptimConfig(lr=lr, max_bad_steps=max_bad_steps), total_steps=10)


def _backward(state: TrainState) -> None:
    model = state.model
    assert isinstance(model, torch.nn.Linear)
    model(torch.randn(8, model.in_features)).square().mean().backward()


def test_an_update_that_would_explode_the_weights_is_skipped_and_counted(one_process):
    """actor.lr=1e30: the gradient norm is finite, the update is not sane; the guard computes
    it before AdamW applies it, so the weights stay exactly as they were."""
    state = _train_state(1e30)
    before = [p.detach().clone() for p in state.model.parameters()]
    _backward(state)
    out = state.step()
    assert math.isfinite(out["grad_norm"]) and out["update_ratio"] > 1e20
    assert state.version == 0 and state.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    assert not state.optimizer.state  # AdamW never stepped: no moments either
    _backward(state)
    state.step()
    _backward(state)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row were skipped.*move the parameters"):
        state.step()
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


def test_the_guard_predicts_the_update_adamw_applies(one_process):
    """update_ratio equals ||delta|| / ||params|| of the step AdamW then takes (weight decay,
    bias correction and the second step's moments included)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    state = TrainState(model, OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.0), total_steps=10)
    for _ in range(2):
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        _backward(state)
        predicted = state.step()["update_ratio"]
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert predicted == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)


def test_a_nan_gradient_skips_the_step(one_process):
    state = _train_state(1e-3)
    (state.model(torch.randn(2, 4)).sum() * float("nan")).backward()
    out = state.step()
    assert math.isnan(out["grad_norm"]) and state.skipped_steps == 1 and state.version == 0


@pytest.fixture
def one_process():
    from core import dist
    dist.init_distributed(device="cpu")
    yield
    dist.destroy()


# --- rewards ----------------------------------------------------------------------------------

if "nan_every_8th" not in SCORERS:
    @register_scorer("nan_every_8th")
    def nan_every_8th(response: str, ground_truth: object) -> float:
        """A broken scorer: NaN for responses "7", inf for "6", else 1."""
        return {"7": float("nan"), "6": float("inf")}.get(response, 1.0)


def test_non_finite_scores_are_replaced_and_counted():
    from core.batch import Batch
    reward = Reward(Reward.Config(scorer="nan_every_8th", nonfinite_score=0.0))
    texts = [str(i) for i in range(8)]
    out = reward.score(Batch(response_text=texts, ground_truth=[""] * 8, data_source=["x"] * 8))
    assert out.value.tolist() == [1, 1, 1, 1, 1, 1, 0, 0] and out.counts["reward/nonfinite"] == 2
    assert torch.isfinite(out.value).all()


def test_answer_tag_extraction_is_linear():
    """1e6 characters of unclosed openings (a regex took > 30 s) and a correct last tag."""
    text = "<answer>" * 125_000 + "<answer>42</answer>"
    assert math_answer_tag_scorer(text, "42") == 1.0
    assert math_answer_tag_scorer("<answer>" * 125_000, "42") == 0.0


# --- prompt files -----------------------------------------------------------------------------

def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_prompt_rows_are_validated_with_file_and_line(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        b'{"problem": "1+1", "answer": "2"}',
        b'{"problem": "caf\xe9", "answer": "1"}',              # latin-1, not UTF-8
        b'{"problem": "x", "answer": null}',
        b'{"problem": "x", "answer": ""}',
        b'{"problem": ["a"], "answer": "1"}',
        b'{"problem": null, "answer": "1"}',
        b'{"problem": "x", "answer": "1", "data_source": "mathh"}',
    ])
    with pytest.raises(ValueError) as e:
        read_prompts(f, RAW, known_source=lambda s: has_scorer(Reward.Config(), s))
    msg = str(e.value)
    assert f"{f}:2: not valid UTF-8 (byte " in msg
    assert f"{f}:3: field 'answer' must be a non-empty value, got None" in msg
    assert f"{f}:4: field 'answer' must be a non-empty value" in msg
    assert f"{f}:5: field 'problem' must be a non-empty string, got list" in msg
    assert f"{f}:6: field 'problem' must be a non-empty string, got NoneType" in msg
    assert "(and 1 more)" in msg  # line 7 (the typo) is the sixth error


def test_an_unknown_data_source_fails_at_load(tmp_path):
    f = _write(tmp_path / "p.jsonl", [b'{"problem": "x", "answer": "1", "data_source": "mathh"}'])
    with pytest.raises(ValueError, match=rf"{f}:1: data_source 'mathh' has no scorer"):
        read_prompts(f, RAW, known_source=lambda s: has_scorer(Reward.Config(), s))
    mapped = Reward.Config(source_scorers={"mathh": "math"})
    assert read_prompts(f, RAW, known_source=lambda s: has_scorer(mapped, s))[0].data_source == "mathh"


def test_bad_rows_can_be_skipped_and_counted(tmp_path, caplog):
    f = _write(tmp_path / "p.jsonl", [b'{"problem": "1+1", "answer": "2"}', b'{"problem": "x", "answer": null}',
                                      b"not json", b'{"problem": "2+2", "answer": 4}'])
    skip = PromptFormat(chat_template=False, instruction="", bad_rows="skip")
    with caplog.at_level("WARNING", logger="core.data"):
        rows = read_prompts(f, skip)
    assert [r.answer for r in rows] == ["2", 4]
    assert "skipped 2 malformed prompt rows of 4" in caplog.text and f"{f}:3: malformed JSON" in caplog.text


# --- model folders ----------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(ROOT / "assets" / "quickstart-sft", out)
    return out


def test_a_folder_without_some_tensors_is_an_error_naming_them(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    dropped = sorted(k for k in weights if "layers.1.mlp" in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \[.*layers\.1\.mlp.*weights do not match"):
        build_model(ModelConfig(path=str(model_dir)))


def test_unexpected_tensors_and_non_finite_weights_are_errors_naming_the_tensor(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys \['model.extra.weight'\]"):
        build_model(ModelConfig(path=str(model_dir)))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' holds 1 non-finite values"):
        build_model(ModelConfig(path=str(model_dir)))


def test_corrupt_files_are_named(model_dir):
    st = model_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{st}: cannot read the safetensors file"):
        build_model(ModelConfig(path=str(model_dir)))
    tok = model_dir / "tokenizer.json"
    tok.write_text(tok.read_text()[:100])
    with pytest.raises(ValueError, match=rf"cannot load the tokenizer in '{model_dir}'"):
        load_tokenizer(ModelConfig(path=str(model_dir)))


def test_a_pad_token_outside_the_vocabulary_becomes_eos_without_growing_it(model_dir):
    """A tokenizer whose config names a pad token the vocabulary lacks: transformers would add
    it at id = vocabulary size (an IndexError at the first padded batch)."""
    cfg_file = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["pad_token"] = "<newpad>"
    cfg_file.write_text(json.dumps(tok_cfg))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tok = load_tokenizer(ModelConfig(path=str(model_dir)))
    assert tok.pad_token_id == tok.eos_token_id < vocab
    assert max(tok(["1", "12345"], padding=True)["input_ids"][0]) < vocab
    assert load_tokenizer(ModelConfig(path=str(model_dir), pad_token_id=0)).pad_token_id == 0


# --- the run log ------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    log = RunLog(tmp_path, is_main=True, total_steps=5)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    with caplog.at_level("WARNING", logger="launch.runlog"):
        log.start(JobConfig(), resume_step=1)
    assert [r["step"] for r in log.history] == [0, 1] and "dropped a torn last line" in caplog.text
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0, 1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed metrics row"):
        read_rows(tmp_path / "metrics.jsonl")
