"""Supervised warm-up on the built-in task: `torchrun ... -m launch.sft --config configs/X.yaml`.

Trains the policy on (prompt, teacher answer + EOS) pairs of the built-in task's training split
(the task's sloppy teacher, core/tasks.py) with the loss on response tokens only, through the
same FSDP2 actor as RL, evaluates held-out accuracy with the same engine and scorer, and writes a Hugging Face folder (safetensors, config,
tokenizer) to `<run.output_dir>/hf` that `model.path` can point at.

It makes the quickstart's starting checkpoint (assets/quickstart-sft; command in its README):
a deterministic start the RL run improves on.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from algorithms.losses import NLLLoss
from core import dist
from core.batch import Batch
from core.config import to_yaml
from core.data import PromptDataset, PromptRow, PromptStream
from core.evaluate import evaluate
from core.hybrid import HybridConfig, HybridEngine
from core.models import ModelConfig, build_model, dtype_of, load_tokenizer, save_hf_folder, shard_model
from core.tasks import build_task, char_tokenizer
from launch.config import DataConfig, EvalConfig, RunConfig
from launch.entry import run_entry
from roles.actor import Actor
from roles.reward import Reward
from roles.rollout import Rollout

logger = logging.getLogger("launch.sft")


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """data.prompts_per_step is the global number of (prompt, answer) pairs per step."""
    actor: Actor.Config = field(default_factory=Actor.Config)
    rollout: Rollout.Config = field(default_factory=Rollout.Config)
    """Only max_new_tokens and dtype matter: evaluation is greedy."""
    eval: EvalConfig = field(default_factory=EvalConfig)


def with_targets(prompts: Batch, targets: list[str], tokenizer, device: torch.device) -> Batch:
    """Add each prompt's supervised target (+ EOS) as its response."""
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in targets]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return prompts.with_fields(response_ids=ids, response_mask=mask).to(device)


def train(cfg: SFTConfig) -> list[dict[str, float]]:
    info = dist.info()
    tokenizer = load_tokenizer(cfg.model) or char_tokenizer()
    task = build_task(cfg.data.task)
    model = build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.run.seed)
    actor = Actor(cfg.actor, shard_model(model, dist.mesh()).to(info.device), total_steps=cfg.run.steps)
    rollout = Rollout.build(cfg.rollout, build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.run.seed),
                            tokenizer, device=info.device, seed=cfg.run.seed, rank=info.rank,
                            dtype=dtype_of(cfg.rollout.dtype))
    hybrid = HybridEngine(HybridConfig(), actor=actor, rollout=rollout,
                          engine_dtype=dtype_of(cfg.rollout.dtype), device=info.device)
    reward = Reward(Reward.Config(), device=info.device)
    stream = PromptStream(PromptDataset(task.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len),
                          batch_size=cfg.data.prompts_per_step // info.world_size, rank=info.rank,
                          world_size=info.world_size, seed=cfg.run.seed, pad_id=tokenizer.pad_token_id)
    out = Path(cfg.run.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    history = []

    def eval_now() -> float:
        hybrid.sync_weights()
        return evaluate(rollout, reward, task.eval, tokenizer, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.rollout.max_new_tokens,
                        max_prompt_len=cfg.data.max_prompt_len)["eval/accuracy"]

    t0 = time.perf_counter()
    loss_fn = NLLLoss()
    teacher_rng = random.Random(cfg.run.seed * 1009 + info.rank)
    for step in range(1, cfg.run.steps + 1):
        prompts = next(stream)
        targets = [task.teacher_answer(PromptRow(p, a, s), teacher_rng) for p, a, s in
                   zip(prompts.prompt_text, prompts.ground_truth, prompts.data_source)]
        batch = with_targets(prompts, targets, tokenizer, info.device)
        metrics = actor.update(batch, loss_fn=loss_fn).metrics
        row = {"step": step, "sft/nll": metrics["actor/nll"], "actor/lr": metrics["actor/lr"]}
        if step == cfg.run.steps or (cfg.eval.every and step % cfg.eval.every == 0):
            row["eval/accuracy"] = eval_now()
        history.append(row)
        if info.is_main:
            logger.info("step %d/%d | nll %.4f%s | %.0f s", step, cfg.run.steps, row["sft/nll"],
                        f" | eval/acc {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else "",
                        time.perf_counter() - t0)
    save_hf_folder(actor.model, tokenizer, out / "hf", is_main=info.is_main)
    if info.is_main:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        logger.info("saved %s", out / "hf")
    return history


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    return run_entry(SFTConfig, train, argv)


if __name__ == "__main__":
    main()
