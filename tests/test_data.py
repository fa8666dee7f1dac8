"""Prompt files, the built-in task, and the rank-sharded prompt stream."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from core.data import PromptDataset, PromptFormat, PromptStream, read_prompts
from launch.tasks import TaskConfig, build_task, char_tokenizer, sloppy_sum

ROOT = Path(__file__).resolve().parents[1]
RAW = PromptFormat(chat_template=False, instruction="")


def test_read_real_benchmark_file():
    rows = read_prompts(ROOT / "data" / "gsm8k_test.jsonl", RAW)
    assert len(rows) == 1319 and rows[0].answer == "18" and rows[0].data_source == "math"
    assert rows[0].prompt.startswith("Janet")


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n{"question": "x", "answer": "1"}\n')
    with pytest.raises(ValueError) as e:
        read_prompts(f, RAW)
    msg = str(e.value)
    assert f"{f}:2:" in msg and f"{f}:3: missing field(s) ['problem']" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl", RAW)


def test_chat_template_and_instruction(tmp_path):
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 +=:|")
    tok.chat_template = ("{% for m in messages %}|{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}|assistant: {% endif %}")
    f = tmp_path / "p.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n')
    fmt = PromptFormat(system_prompt="be brief", instruction=" box it")
    assert read_prompts(f, fmt, tok)[0].prompt == "|system: be brief|user: 1+1 box it|assistant: "
    with pytest.raises(ValueError, match="no chat template"):
        read_prompts(f, PromptFormat(), char_tokenizer())


def test_addition_task_split_and_sloppy_teacher():
    task = build_task(TaskConfig(train_size=3000, eval_size=200))
    assert not {r.prompt for r in task.train} & {r.prompt for r in task.eval}
    assert task.eval[0].prompt[3] == "+" and len(task.eval[0].answer) == 4
    rng = random.Random(0)
    assert sloppy_sum(195, 807, digits=3, drop=0.0, rng=rng) == "1002"
    assert sloppy_sum(195, 807, digits=3, drop=1.0, rng=rng) == "0992"  # every carry forgotten
    assert sloppy_sum(123, 456, digits=3, drop=1.0, rng=rng) == "0579"  # nothing to forget
    for row in task.eval[:50]:
        a, b = map(int, row.prompt[:-1].split("+"))
        assert row.answer == f"{a + b:04d}"


def test_prompt_stream_shards_ranks_and_continues_across_epochs():
    tok = char_tokenizer()
    task = build_task(TaskConfig(train_size=40, eval_size=4))
    data = PromptDataset(task.train, tok, max_prompt_len=16)
    streams = [PromptStream(data, batch_size=5, rank=r, world_size=2, seed=3, pad_id=0) for r in (0, 1)]
    epoch0 = [[next(s).group_ids.tolist() for _ in range(4)] for s in streams]
    seen = [i for rank in epoch0 for b in rank for i in b]
    assert sorted(seen) == list(range(40))  # one epoch: every prompt once, no rank overlap
    nxt = next(streams[0])
    assert streams[0].epoch == 1 and len(nxt) == 5
    # a restored stream continues with exactly the same batches
    s = PromptStream(data, batch_size=5, rank=0, world_size=2, seed=3, pad_id=0)
    next(s), next(s)
    state = s.state_dict()
    expect = [next(s).group_ids.tolist() for _ in range(3)]
    r = PromptStream(data, batch_size=5, rank=0, world_size=2, seed=3, pad_id=0)
    r.load_state_dict(state)
    assert [next(r).group_ids.tolist() for _ in range(3)] == expect


def test_prompt_length_filter_counts_drops():
    tok = char_tokenizer()
    task = build_task(TaskConfig(train_size=10, eval_size=1))
    assert PromptDataset(task.train, tok, max_prompt_len=8).dropped == 0
    with pytest.raises(ValueError, match="no prompts left"):
        PromptDataset(task.train, tok, max_prompt_len=3)


def _resume_on_rank(total_batches: int, saved_after: int) -> dict:
    """This rank's batches straight, and again after save at `saved_after` + restore into a new loader."""
    from core import dist
    info = dist.info()
    tok = char_tokenizer()
    data = PromptDataset(build_task(TaskConfig(train_size=40, eval_size=4)).train, tok, max_prompt_len=16)

    def stream():
        return PromptStream(data, batch_size=3, rank=info.rank, world_size=info.world_size, seed=7, pad_id=0)
    straight = [next(s).group_ids.tolist() for s in [stream()] for _ in range(total_batches)]
    first = stream()
    for _ in range(saved_after):
        next(first)
    state = first.state_dict()
    restored = stream()
    restored.load_state_dict(state)
    after = [next(restored).group_ids.tolist() for _ in range(total_batches - saved_after)]
    return {"straight": straight, "after": after, "epoch": restored.epoch}


@pytest.mark.dist
@pytest.mark.parametrize("saved_after", [3, 6])
def test_resume_on_two_ranks_mid_epoch_and_across_the_boundary(saved_after):
    """20 prompts per rank, 3 per batch: 6 batches an epoch. Save after 3 (mid-epoch) or after 6
    (exactly at the boundary), restore into a new loader: the next batches are identical,
    including those of the next epoch."""
    from tests.dist_utils import run_distributed
    ranks = run_distributed(_resume_on_rank, 10, saved_after, world_size=2)
    for r in ranks:
        assert r["after"] == r["straight"][saved_after:]
        assert r["epoch"] == 1
    assert not set(sum(ranks[0]["straight"][:6], [])) & set(sum(ranks[1]["straight"][:6], []))
    assert ranks[0]["straight"][6:] != ranks[0]["straight"][:4]  # a new epoch, a new order


def test_parquet_prompt_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from core.data import read_prompts
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["1+1", "2+2"], "answer": ["2", "4"]}), f)
    rows = read_prompts(f, RAW)
    assert [(r.prompt, r.answer, r.data_source) for r in rows] == [("1+1", "2", "math"), ("2+2", "4", "math")]
    pq.write_table(pa.table({"question": ["1+1"], "answer": ["2"]}), f)
    with pytest.raises(ValueError, match=r"p.parquet:row 1: missing field\(s\) \['problem'\]"):
        read_prompts(f, RAW)


def test_char_tokenizer_round_trips_runs_of_newlines():
    tok = char_tokenizer("ab\n ")
    text = "a\n\n\nb a"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
