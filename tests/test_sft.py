"""launch.sft: packing layout, the response-only loss, LoRA merging, and end-to-end runs (full
and LoRA, the built-in task and JSONL files) on 2 gloo processes."""
from __future__ import annotations

import json

import pytest
import torch

from core.batch import GlobalCounts
from core.data import PromptFormat, read_sft_pairs
from core.lora import LoraConfig, apply_lora, lora_scalings, merged_buckets
from core.models import ModelConfig, build_model
from core.packing import PackedNLL, SFTExample, pack
from tests.dist_utils import run_distributed
from tests.test_train_e2e import torchrun

TINY = ModelConfig(config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=40))


def examples(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [SFTExample(torch.randint(3, 40, (p,), generator=g).tolist(),
                       torch.randint(3, 40, (r,), generator=g).tolist()) for p, r in shapes]


def test_packing_layout_by_hand():
    a, b, c = SFTExample([5, 6], [7, 1]), SFTExample([8], [9, 9, 1]), SFTExample([4, 4, 4], [1])
    rows = pack([a, b, c], max_len=8, pad_id=0)
    assert rows.packed_ids.tolist() == [[5, 6, 7, 1, 8, 9, 9, 1], [4, 4, 4, 1, 0, 0, 0, 0]]
    assert rows.packed_pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert rows.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0, 0]]
    one_each = pack([a, b, c], max_len=8, pad_id=0, packed=False)
    assert one_each.packed_ids.tolist() == [[5, 6, 7, 1], [8, 9, 9, 1], [4, 4, 4, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack([a], max_len=3, pad_id=0)


def per_example_nll(model, exs):
    """Token-mean NLL of the response tokens, each example run on its own (no packing)."""
    total, n = 0.0, 0
    for ex in exs:
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        picked = logp.gather(-1, targets[:, None])[:, 0]
        total = total - picked[len(ex.prompt_ids) - 1:].sum()
        n += len(ex.response_ids)
    return total / n


def test_packed_loss_is_the_per_example_response_token_mean():
    model = build_model(TINY, seed=0)
    exs = examples([(3, 4), (5, 2), (2, 6), (4, 4), (6, 1)])
    want = per_example_nll(model, exs)
    for packed in (True, False):
        rows = pack(exs, max_len=16, pad_id=0, packed=packed)
        counts = GlobalCounts(tokens=float(rows.loss_mask.sum()), seqs=len(exs))
        got, _ = PackedNLL(model)(rows, counts)
        assert got.item() == pytest.approx(want.item(), rel=1e-5), packed
    assert rows.packed_ids.shape[0] == 5 and pack(exs, max_len=16, pad_id=0).packed_ids.shape[0] == 3


def test_prompt_tokens_carry_no_loss():
    """The gradient of the loss w.r.t. the logits that predict prompt tokens (and padding) is
    exactly zero; it is non-zero where they predict response tokens."""
    model = build_model(TINY, seed=0)
    exs = examples([(4, 3), (3, 2), (5, 3)], seed=1)
    rows = pack(exs, max_len=24, pad_id=0)
    kept = {}

    def hook(_module, _inputs, out):
        out.retain_grad()
        kept["logits"] = out
    model.lm_head.register_forward_hook(hook)
    loss, _ = PackedNLL(model)(rows, GlobalCounts(tokens=float(rows.loss_mask.sum()), seqs=3))
    loss.backward()
    grad_norm = kept["logits"].grad[0].norm(dim=-1)  # [L]: position t predicts token t + 1
    predicts_response = rows.loss_mask[0, 1:].bool()
    assert (grad_norm[:-1][~predicts_response] == 0).all()
    assert (grad_norm[:-1][predicts_response] > 0).all()
    assert grad_norm[-1] == 0  # the last position predicts nothing


def test_sft_files_report_bad_rows_with_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"problem": "1+1=", "response": "02"}\n{"problem": "2+2="}\nnot json\n'
                    '{"problem": "3+3=", "response": ""}\n')
    fmt = PromptFormat(chat_template=False, instruction="")
    with pytest.raises(ValueError) as e:
        read_sft_pairs(path, fmt, "response")
    msg = str(e.value)
    assert f"{path}:2: missing field(s) ['response']" in msg and f"{path}:3: malformed JSON" in msg
    assert f"{path}:4: field 'response' must be a non-empty string" in msg
    path.write_text('{"problem": "1+1=", "response": "02"}\n')
    assert read_sft_pairs(path, fmt, "response") == [("1+1=", "02")]


def test_lora_merge_matches_peft_merge_and_unload():
    torch.manual_seed(0)
    model = apply_lora(build_model(TINY, seed=0), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # lora_B starts at zero; make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    scalings = lora_scalings(model)
    assert len(scalings) == 2 * 7 and set(scalings.values()) == {2.0}
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    merged = dict(pair for bucket in merged_buckets([named], scalings) for pair in bucket)
    # the same in buckets of about one tensor, and out of order within a module
    buckets = [[pair] for pair in reversed(named)]
    in_buckets = {n: t for b in merged_buckets(buckets, scalings) for n, t in b}
    want = dict(model.merge_and_unload().named_parameters())
    assert set(merged) == set(want) == set(in_buckets)
    for name, w in want.items():
        torch.testing.assert_close(merged[name], w.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(in_buckets[name], w.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="incomplete LoRA modules"):
        dropped = next(i for i, (n, _) in enumerate(named) if "lora_B" in n)
        list(merged_buckets([named[:dropped] + named[dropped + 1:]], scalings))


MIN_DROP = {False: 1.5, True: 0.8}
"""Least drop of held-out NLL (nats per answer token) asserted, full / LoRA (see the test)."""
SFT_2DIGIT = ["run.steps=300", "eval.every=0", "data.task.digits=2", "data.task.eval_size=200",
              "data.task.train_size=5000", "data.task.teacher_carry_drop=0", "sft.max_seq_len=64",
              "actor.warmup_steps=10", "actor.lr=3e-3"]


def held_out_accuracy(model_dir: str, eval_size: int, digits: int) -> float:
    """Greedy accuracy of a saved Hugging Face folder on the built-in task's held-out split."""
    from core import dist
    from core.models import load_tokenizer
    from launch.build import build_rollout
    from launch.evaluate import held_out_accuracy as accuracy
    from launch.tasks import TaskConfig, build_task
    from roles.reward import Reward
    from roles.rollout import Rollout
    cfg = ModelConfig(path=model_dir)
    tok = load_tokenizer(cfg)
    rollout = build_rollout(Rollout.Config(max_new_tokens=6), cfg, vocab=len(tok), tokenizer=tok, seed=0)
    task = build_task(TaskConfig(digits=digits, eval_size=eval_size, train_size=5000))
    return accuracy(task.eval, rollout=rollout, reward=Reward(Reward.Config(), device=dist.info().device),
                    tokenizer=tok, batch_size=200, max_new_tokens=6, max_prompt_len=16)["eval/accuracy"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("lora", [False, True])
def test_sft_raises_held_out_accuracy_above_the_untrained_model(tmp_path, lora):
    """From random weights, 2-digit addition, 300 steps, 2 processes. The robust signal is the
    held-out NLL of the correct answers (eval/nll); accuracy at 300 steps sits on the steep part
    of the learning curve, so it only has to beat the untrained model.

    Measured over run.seed 0-3 (2026-12-01, transformers 5.24, torch 2.13, 2 processes):
    full fine-tuning eval/nll 3.05-3.16 -> 0.20-0.65 (drops 2.51, 2.88, 2.42, 2.53: mean 2.59,
    sd 0.20), accuracy 0.0 -> 0.11, 0.93, 0.145, 0.23; LoRA (r=16 on every linear layer, 15% of
    the weights trainable) eval/nll -> 1.14-1.58 (drops 1.65, 1.72, 1.91, 1.55: mean 1.71, sd
    0.15), accuracy 0.0 -> 0.095, 0.32, 0.87, 0.07. Asserted: a drop of at least MIN_DROP
    (1.5 full, 0.8 LoRA: about 5 standard deviations below the mean drop), and accuracy above
    the untrained model's (another machine measured 0.045 for LoRA at seed 0)."""
    out = tmp_path / "sft"
    torchrun("configs/quickstart-sft.yaml", f"run.output_dir={out}", *SFT_2DIGIT,
             f"sft.lora.enabled={str(lora).lower()}", module="launch.sft")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 300
    assert first["eval/nll"] - last["eval/nll"] >= MIN_DROP[lora], (first, last)
    assert last["eval/accuracy"] >= first["eval/accuracy"] + 0.02, (first, last)
    assert rows[-1]["sft/nll"] < rows[1]["sft/nll"] - 0.5
    assert (out / "adapter" / "adapter_config.json").exists() == lora
    # The saved folder (LoRA merged by peft) scores what the engine scored with the adapters
    # folded in during training.
    saved = run_distributed(held_out_accuracy, str(out / "hf"), 200, 2, world_size=1)[0]
    assert saved == pytest.approx(last["eval/accuracy"], abs=0.011)


@pytest.mark.dist
def test_lora_sft_from_files_on_a_model_folder(tmp_path):
    """(prompt, response) JSONL files, a local model folder (the quickstart's sloppy SFT model,
    which gets carries wrong), LoRA on correct answers: held-out accuracy rises within 20 steps."""
    from launch.tasks import TaskConfig, build_task
    task = build_task(TaskConfig(eval_size=100, train_size=2000))
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"problem": r.prompt, "response": r.answer}) + "\n"
                             for r in task.train))
    held_out.write_text("".join(json.dumps({"problem": r.prompt, "answer": r.answer}) + "\n"
                                for r in task.eval))
    out = tmp_path / "sft"
    torchrun("configs/quickstart-sft.yaml", f"run.output_dir={out}", "model.path=assets/quickstart-sft",
             f"data.train_files=[{train}]", f"data.eval_files=[{held_out}]",
             "data.format={chat_template: false, instruction: '', data_source: addition}",
             "run.steps=20", "eval.every=0", "sft.max_seq_len=64", "sft.lora.enabled=true",
             "actor.warmup_steps=2", module="launch.sft")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/n"] == 100
    assert rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"] + 0.2, (rows[0], rows[-1])
