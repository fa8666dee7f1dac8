"""The built-in `long_addition` task (launch/tasks.py), its scorer, its lazy teacher, its
tokenizer and checkpoint, and a 2-step run of the long quickstart (configs/quickstart-long.yaml)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.config import load_config
from launch.config import JobConfig
from launch.tasks import (
    ALPHABET,
    LongAdditionConfig,
    TaskConfig,
    build_task,
    char_tokenizer,
    task_tokenizer,
    worked_sum,
)
from roles.reward.scorers import extract_answer, get_scorer
from tests.test_train_e2e import read_metrics, torchrun

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "quickstart-long-sft"
score = get_scorer("long_addition")
LINE = re.compile(r"(\d+)\+(\d+):(\d+)")


def operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


# --------------------------------------------------------------------------- generation


def test_generation_is_seeded_with_a_disjoint_held_out_split():
    cfg = LongAdditionConfig(train_size=3000, eval_size=400)
    task, again = build_task(cfg), build_task(LongAdditionConfig(train_size=3000, eval_size=400))
    assert task.train == again.train and task.eval == again.eval
    other = build_task(LongAdditionConfig(train_size=3000, eval_size=400, seed=7))
    assert other.eval != task.eval
    assert len(task.train) == 3000 and len(task.eval) == 400
    assert len({r.prompt for r in task.eval}) == 400  # held-out problems are distinct
    assert not {r.prompt for r in task.eval} & {r.prompt for r in task.train}
    digits = set()
    for row in task.train + task.eval:
        a, b = operands(row.prompt)
        sa, sb = row.prompt.rstrip("=").split("+")
        assert len(sa) == len(sb) and (len(sa) == 1 or sa[0] != "0" and sb[0] != "0")
        assert row.answer == str(a + b) and row.data_source == "long_addition"
        digits.add(len(sa))
    assert digits == set(range(1, 9))


def test_digit_range_and_held_out_capacity_are_checked():
    rows = build_task(LongAdditionConfig(digits=4, min_digits=3, train_size=200, eval_size=50)).train
    assert {len(operands(r.prompt)[0].__str__()) for r in rows} == {3, 4}
    with pytest.raises(ValueError, match="held-out 1-digit problems, but there are only 100"):
        build_task(LongAdditionConfig(digits=1, eval_size=100, train_size=10))
    with pytest.raises(ValueError, match="digits must be >= 3"):
        LongAdditionConfig(digits=2, min_digits=3)
    with pytest.raises(ValueError, match="teacher_skip must be in"):
        LongAdditionConfig(teacher_skip=1.5)


def test_worked_solutions_are_true_and_vary_in_length_tenfold():
    """Every line "A+B:P" after i columns keeps a + b = (A + B) * 10**i + P, with P of i + 1
    digits; the answer after "=" is the sum; lengths (in tokens, EOS included) span >= 10x."""
    task = build_task(LongAdditionConfig(train_size=0, eval_size=500))
    tok = task_tokenizer(task.cfg)
    lengths = []
    for row in task.eval:
        a, b = operands(row.prompt)
        text = worked_sum(a, b)
        lines = text.split("\n")
        assert lines[0] == "" and lines[-1] == f"={a + b}"
        for i, line in enumerate(lines[1:-1], start=1):
            m = LINE.fullmatch(line)
            assert m is not None, line
            assert len(m.group(3)) == i + 1
            assert a + b == (int(m.group(1)) + int(m.group(2))) * 10**i + int(m.group(3))
        assert len(lines) == len(str(a)) + 1  # one line per column but the last
        assert score(text, row.answer) == 1.0
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
        lengths.append(len(ids) + 1)
    assert max(lengths) / min(lengths) >= 10, (min(lengths), max(lengths))
    assert worked_sum(4567, 8912) == "\n456+891:09\n45+89:079\n4+8:1479\n=13479"
    assert worked_sum(5, 7) == "\n=12"
    with pytest.raises(ValueError, match="equal length"):
        worked_sum(123, 45)


# --------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("response, expected", [
    ("13479", 1.0),                                     # direct: the prompt's "=" is the marker
    (" 13479\n", 1.0),
    ("\n456+891:09\n45+89:079\n4+8:1479\n=13479", 1.0),  # worked
    ("anything at all, even = signs = 13479", 1.0),      # only the text after the last "=" counts
    ("=13479=", 0.0),                                    # a marker with nothing after it
    ("=13479=13478", 0.0),
    ("013479", 0.0),                                     # no leading zeros
    ("\n456+891:09\n45+89:079", 0.0),                    # cut off before the answer
    ("1347", 0.0),
    ("13479 ", 1.0),
    ("", 0.0),
    ("1 3479", 0.0),
    ("١٣٤٧٩", 0.0),                                      # unicode digits are not the answer
])
def test_long_addition_scorer_by_hand(response, expected):
    assert score(response, "13479") == expected


def test_long_addition_scorer_rejects_bad_ground_truth_and_is_linear():
    with pytest.raises(ValueError, match="ASCII digits"):
        score("12", "1.2")
    long = "=" * 2_000_000 + "7"  # a regex that backtracks over many markers would take minutes
    assert score(long, "7") == 1.0
    assert extract_answer("long_addition", "\n4+8:1479\n=13479") == "13479"
    assert extract_answer("long_addition", "=") is None


# --------------------------------------------------------------------------- teacher


def test_teacher_skips_the_worked_lines_at_its_rate():
    task = build_task(LongAdditionConfig(train_size=4000, eval_size=10))
    rng = random.Random(0)
    answers = [(row, task.teacher_answer(row, rng)) for row in task.train]
    skipped = [text for _, text in answers if not text.startswith("\n")]
    rate, n = len(skipped) / len(answers), len(answers)
    sd = (0.7 * 0.3 / n) ** 0.5
    assert abs(rate - 0.7) < 4 * sd, rate
    for row, text in answers:  # both modes of the exact (lazy) teacher are right
        assert score(text, row.answer) == 1.0
        assert text == row.answer or text == worked_sum(*operands(row.prompt))
    for skip, worked in ((0.0, True), (1.0, False)):
        cfg = LongAdditionConfig(train_size=200, eval_size=10, teacher_skip=skip)
        t = build_task(cfg)
        assert all(t.teacher_answer(r, rng).startswith("\n") == worked for r in t.train)


def test_a_sloppy_lazy_teacher_drops_carries_in_its_direct_answers():
    cfg = LongAdditionConfig(train_size=500, eval_size=10, teacher_skip=1.0, teacher_carry_drop=1.0)
    task = build_task(cfg)
    rng = random.Random(0)
    for row in task.train:
        a, b = operands(row.prompt)
        no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a), str(b))))
        assert task.teacher_answer(row, rng) == str(no_carry)


# --------------------------------------------------------------------------- config and tokenizer


def test_the_task_is_a_typed_slot():
    cfg = load_config(JobConfig, None, ["data.task.name=long_addition", "data.task.min_digits=2"])
    assert type(cfg.data.task) is LongAdditionConfig and cfg.data.task.min_digits == 2
    assert cfg.data.task.digits == 8 and cfg.data.task.teacher_carry_drop == 0.0  # its own defaults
    assert type(load_config(JobConfig, None, []).data.task) is TaskConfig  # addition stays the default
    with pytest.raises(ValueError, match="unknown built-in task 'adition'; valid names: addition, long_addition"):
        load_config(JobConfig, None, ["data.task.name=adition"])
    with pytest.raises(ValueError, match="did you mean 'data.task.min_digits'"):
        load_config(JobConfig, None, ["data.task.name=long_addition", "data.task.min_digit=2"])
    with pytest.raises(ValueError, match="data.task.min_digits"):
        load_config(JobConfig, None, ["data.task.min_digits=2"])  # not a field of addition
    with pytest.raises(TypeError, match="configured by LongAdditionConfig"):
        build_task(TaskConfig(name="long_addition"))


def test_tokenizers_are_per_task_and_addition_keeps_its_vocabulary():
    addition, long = task_tokenizer(TaskConfig()), task_tokenizer(LongAdditionConfig())
    assert addition.get_vocab() == char_tokenizer().get_vocab() and len(addition) == 20
    assert len(long) == 22 and all(long.get_vocab()[ch] == addition.get_vocab()[ch] for ch in ALPHABET)
    assert long("4+8:1\n", add_special_tokens=False)["input_ids"] != addition("4+8:1\n", add_special_tokens=False)[
        "input_ids"]  # ":" and the line break are <unk> to the addition alphabet
    shipped = AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    assert shipped.get_vocab() == long.get_vocab()  # the checkpoint's tokenizer is the task's


def test_checkpoint_is_small_and_its_command_is_recorded():
    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size < 4_000_000, size
    command = "torchrun --nproc_per_node=2 -m launch.sft --config configs/quickstart-long-sft.yaml"
    assert command in (ASSET / "README.md").read_text()
    assert command in (ROOT / "configs" / "quickstart-long-sft.yaml").read_text()
    assert "assets/quickstart-long-sft" in (ROOT / "configs" / "quickstart-long.yaml").read_text()
    config = json.loads((ASSET / "config.json").read_text())
    assert config["vocab_size"] == 22


# --------------------------------------------------------------------------- the long quickstart


@pytest.mark.dist
def test_long_quickstart_runs_two_steps_on_two_processes(tmp_path):
    """The shipped config, 2 steps on 2 processes: the long_addition scorer rewards samples,
    some samples work the sum out (the SFT model does so about 30% of the time), nothing is cut
    off by the response budget, and every step reaches metrics.jsonl."""
    out = tmp_path / "run"
    torchrun("configs/quickstart-long.yaml", f"run.output_dir={out}", "run.steps=2", "eval.every=0",
             "data.prompts_per_step=8", "rollout.n=4", "data.task.eval_size=40", "data.task.train_size=500",
             "checkpoint.export_hf=false", "tracking.enabled=false")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/n"] == 40 and 0.0 <= rows[0]["eval/accuracy"] <= 1.0
    for row in rows[1:]:
        assert row["reward/errors"] == 0.0
        assert 0.0 < row["reward/mean"] < 1.0
        assert row["response_length/max"] > 20  # at least one sample wrote worked lines
        assert row["response_length/clip_ratio"] == 0.0
