"""Held-out accuracy during training: greedy decoding on this rank's shard, summed over ranks."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from core import dist
from core.data import PromptDataset, PromptRow, collate_prompts, shard_rows


@torch.no_grad()
def evaluate(rollout: Any, reward: Any, rows: Sequence[PromptRow], tokenizer, *,
             batch_size: int, max_new_tokens: int, max_prompt_len: int) -> dict[str, float]:
    """{"eval/accuracy", "eval/n"} over all ranks (collective). Greedy, one sample per prompt."""
    info = dist.info()
    mine = shard_rows(rows, info.rank, info.world_size)
    correct = 0.0
    sampling = rollout.sampling(temperature=0.0, n=1, max_new_tokens=max_new_tokens)
    if mine:
        data = PromptDataset(mine, tokenizer, max_prompt_len=max_prompt_len)
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            batch = collate_prompts(items, pad_id=tokenizer.pad_token_id).to(info.device)
            out = rollout.generate(batch, sampling)
            correct += float(reward.score(out).value.sum())
    total = dist.all_reduce_scalars({"correct": correct, "n": float(len(mine))})
    return {"eval/accuracy": total["correct"] / max(total["n"], 1.0), "eval/n": total["n"]}
