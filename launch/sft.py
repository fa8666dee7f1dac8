"""Supervised fine-tuning: `torchrun ... -m launch.sft --config configs/X.yaml`.

Data: `data.train_files` (JSONL or Parquet rows with a prompt and a response, e.g. long
reasoning traces; the prompt is rendered like an RL prompt through `data.format`), or, with no
files, the built-in task's prompts answered by its sloppy teacher (launch/tasks.py).

Training: the same FSDP2 actor, optimizer and schedule as RL; examples packed into rows of
`sft.max_seq_len` tokens (core/packing.py); the loss is the token-mean NLL of response tokens
only. Full fine-tuning, or LoRA adapters through peft (`sft.lora.enabled=true`).

Evaluation: held-out accuracy (greedy, same engine and scorer as RL) before step 1, every
`eval.every` steps and at the end, on `data.eval_files`, or the task's held-out split when
training on the task. LoRA adapters are folded into the weights streamed to the engine.
Benchmarks (pass@k etc.) are for launch.eval on the output folder.

Output in run.output_dir: `hf/` (a Hugging Face folder, LoRA merged, that `model.path` of
launch.train and launch.eval takes), `adapter/` (the peft adapter, LoRA only), metrics.jsonl,
config.yaml and an MLflow run. It makes the quickstart's starting checkpoint
(assets/quickstart-sft; command in its README).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core import dist
from core.config import at_least
from core.data import PromptRow, ShardedSampler, read_prompts, read_sft_pairs, shard_rows
from core.hybrid import HybridConfig, HybridEngine
from core.lora import LoraConfig
from core.models import ModelConfig, dtype_of, load_tokenizer, save_hf_folder
from core.packing import PackedNLL, SFTExample, encode_examples, held_out_nll, pack
from core.tracking import TrackingConfig
from launch.build import build_policy, build_rollout
from launch.config import DataConfig, EvalConfig, RunConfig
from launch.entry import exit_after, run_entry
from launch.evaluate import held_out_accuracy
from launch.runlog import RunLog
from launch.tasks import build_task, char_tokenizer
from roles.actor import Actor
from roles.reward import Reward
from roles.reward.role import has_scorer
from roles.rollout import Rollout

logger = logging.getLogger("launch.sft")


@dataclass(kw_only=True, slots=True)
class SFTOptions:
    response_key: str = "response"
    """Field of the target response in data.train_files (the prompt field is data.format.prompt_key)."""
    max_seq_len: int = 4096
    """Tokens per packed row; longer examples are dropped and counted."""
    pack: bool = True
    """Pack several examples per row (False: one example per row, right-padded)."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        at_least(self, 2, "max_seq_len")


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """data.prompts_per_step is the global number of examples per step."""
    sft: SFTOptions = field(default_factory=SFTOptions)
    actor: Actor.Config = field(default_factory=Actor.Config)
    """actor.micro_batch_size counts packed rows."""
    rollout: Rollout.Config = field(default_factory=Rollout.Config)
    """Only max_new_tokens and dtype matter: evaluation is greedy."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class ExampleSource:
    """This rank's examples for each step: from files (a seeded per-epoch permutation, sharded
    over ranks) or from the built-in task and its teacher."""

    def __init__(self, cfg: SFTConfig, tokenizer, *, rank: int, world_size: int) -> None:
        self.tokenizer = tokenizer
        self.per_rank = cfg.data.prompts_per_step // world_size
        if self.per_rank < 1 or cfg.data.prompts_per_step % world_size:
            raise ValueError(f"data.prompts_per_step={cfg.data.prompts_per_step} must be a positive "
                             f"multiple of the world size {world_size}")
        self.max_len = cfg.sft.max_seq_len
        self.task = None
        if cfg.data.train_files:
            pairs = [p for f in cfg.data.train_files
                     for p in read_sft_pairs(f, cfg.data.format, cfg.sft.response_key, tokenizer)]
            self.examples = encode_examples(pairs, tokenizer, max_len=self.max_len)
            n = len(self.examples)
        else:
            self.task = build_task(cfg.data.task)
            self.teacher = random.Random(cfg.run.seed * 1009 + rank)
            n = len(self.task.train)
        self.sampler = ShardedSampler(n, rank=rank, world_size=world_size, seed=cfg.run.seed,
                                      shuffle=cfg.data.shuffle)
        self._it = iter(self.sampler)

    def _indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.per_rank:
            try:
                out.append(next(self._it))
            except StopIteration:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._it = iter(self.sampler)
        return out

    def next(self) -> list[SFTExample]:
        idx = self._indices()
        if self.task is None:
            return [self.examples[i] for i in idx]
        rows = [self.task.train[i] for i in idx]
        pairs = [(r.prompt, self.task.teacher_answer(r, self.teacher)) for r in rows]
        return encode_examples(pairs, self.tokenizer, max_len=self.max_len)


def train(cfg: SFTConfig) -> list[dict[str, float]]:
    info = dist.info()
    tokenizer = load_tokenizer(cfg.model) or char_tokenizer()
    source = ExampleSource(cfg, tokenizer, rank=info.rank, world_size=info.world_size)
    held_out: list[PromptRow] | None
    if cfg.data.eval_files:
        reward_cfg = Reward.Config()  # held-out rows are scored by their data source's scorer
        known = lambda source: has_scorer(reward_cfg, source)  # noqa: E731
        held_out = [r for f in cfg.data.eval_files
                    for r in read_prompts(f, cfg.data.format, tokenizer, known_source=known)]
    else:  # the task's split; none when training on files (evaluate benchmarks with launch.eval)
        held_out = None if cfg.data.train_files else build_task(cfg.data.task).eval
    model = build_policy(cfg.model, vocab=len(tokenizer), seed=cfg.run.seed, param_dtype=cfg.actor.param_dtype,
                         lora=cfg.sft.lora)
    actor = Actor(cfg.actor, model, total_steps=cfg.run.steps)
    rollout: Rollout | None = None
    hybrid: HybridEngine | None = None
    if held_out is not None:  # an engine only when there is something to evaluate
        rollout = build_rollout(cfg.rollout, cfg.model, vocab=len(tokenizer), tokenizer=tokenizer, seed=cfg.run.seed)
        hybrid = HybridEngine(HybridConfig(), actor=actor, rollout=rollout,
                              engine_dtype=dtype_of(cfg.rollout.dtype), device=info.device)
    reward = Reward(Reward.Config(), device=info.device)
    out = Path(cfg.run.output_dir)
    log = RunLog(out, is_main=info.is_main, total_steps=cfg.run.steps)
    log.start(cfg, resume_step=None)
    log.open_tracker(cfg.tracking, cfg)
    trainable = sum(p.numel() for p in actor.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in actor.model.parameters())
    logger.info("trainable parameters: %d of %d (%s)", trainable, total,
                "LoRA" if cfg.sft.lora.enabled else "full")
    loss_fn = PackedNLL(actor.model)

    # On the built-in task the held-out answers are exactly the training targets' format, so
    # their NLL is a smooth held-out signal next to the (steep, thresholded) accuracy.
    nll_examples = ([] if held_out is None or cfg.data.train_files else encode_examples(
        [(r.prompt, r.answer) for r in shard_rows(held_out, info.rank, info.world_size)],
        tokenizer, max_len=cfg.sft.max_seq_len))

    def eval_now(*, first: bool = False) -> dict[str, float]:
        if held_out is None or rollout is None or hybrid is None:
            return {}
        hybrid.sync_weights(force=first or rollout.needs_full_sync)
        rollout.wake()
        out = held_out_accuracy(held_out, rollout=rollout, reward=reward, tokenizer=tokenizer,
                                batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                                max_prompt_len=cfg.data.max_prompt_len)
        rollout.sleep()  # the engine's memory (KV cache; SGLang: everything) back to training
        if not cfg.data.train_files:
            out["eval/nll"] = held_out_nll(actor.model, nll_examples, max_len=cfg.sft.max_seq_len,
                                           pad_id=tokenizer.pad_token_id,
                                           rows_per_forward=cfg.actor.micro_batch_size, device=info.device)
        return out

    log.record(0, eval_now(first=True))
    for step in range(1, cfg.run.steps + 1):
        t_step = time.perf_counter()
        rows = pack(source.next(), max_len=cfg.sft.max_seq_len, pad_id=tokenizer.pad_token_id,
                    packed=cfg.sft.pack).to(info.device)
        m = actor.train_state.update(rows, loss_fn)
        seconds = time.perf_counter() - t_step
        row = {"sft/nll": m["nll"], "sft/tokens": m["tokens"], "sft/rows": m["rows"],
               "actor/lr": m["lr"], "actor/grad_norm": m["grad_norm"], "timing_s/step": seconds,
               "perf/tokens_per_s": float(rows.packed_ids.numel()) * info.world_size / seconds}
        if step == cfg.run.steps or (cfg.eval.every and step % cfg.eval.every == 0):
            row.update(eval_now())
        log.record(step, row)
    save_hf_folder(actor.model, tokenizer, out / "hf", is_main=info.is_main,
                   lora=cfg.sft.lora if cfg.sft.lora.enabled else None)
    if info.is_main:
        accuracy = [r["eval/accuracy"] for r in log.history if "eval/accuracy" in r]
        logger.info("saved %s%s", out / "hf", f"; eval/accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}"
                    if accuracy else "")
    log.finish()
    return log.history


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    return run_entry(SFTConfig, train, argv, before_init=lambda cfg: cfg.rollout.engine.prepare_process())


if __name__ == "__main__":
    exit_after(main)
