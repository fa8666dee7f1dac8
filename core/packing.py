"""Supervised examples, sequence packing and the response-only NLL loss (launch.sft).

An example is (prompt ids, response ids + EOS). Packing lays examples end to end in rows of at
most `max_len` tokens, in the order given (no reordering, so a step's content does not depend on
lengths); position ids restart at 0 at every example, which makes transformers attend only
within an example. One row per example (`pack=False`) is the same layout with a single example
per row, so both paths share one loss:

    row        p p p r r e | p p r e | pad pad
    positions  0 1 2 3 4 5 | 0 1 2 3 | 4   5        (padding continues the last example)
    loss_mask  0 0 0 1 1 1 | 0 0 1 1 | 0   0        (response tokens and EOS: the targets)

The step loss is the token mean over every response token of the step on every rank (the
micro-batch returns its share, core/optim.py), so it does not depend on how examples are
packed or split.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from core import dist
from core.batch import Batch, GlobalCounts, declare_field
from core.models import packed_logprobs

logger = logging.getLogger(__name__)

declare_field("packed_ids", shape="B,L", doc="token ids of packed (prompt, response) examples, right-padded")
declare_field("packed_pos", shape="B,L", doc="position ids, restarting at 0 at every packed example")


@dataclass(frozen=True, slots=True)
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]
    """The target tokens, EOS included."""

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.response_ids:
            raise ValueError("an SFT example needs a non-empty prompt and response")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_examples(pairs: Sequence[tuple[str, str]], tokenizer, *, max_len: int) -> list[SFTExample]:
    """Tokenize (prompt, response) text pairs (EOS appended to the response); examples longer
    than max_len are dropped and counted (a silent filter would hide data problems)."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = [SFTExample(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    kept = [e for e in out if len(e) <= max_len]
    if len(kept) < len(out):
        logger.warning("dropped %d of %d SFT examples longer than %d tokens (sft.max_seq_len)",
                       len(out) - len(kept), len(out), max_len)
    if not kept:
        raise ValueError(f"no SFT examples of at most {max_len} tokens (sft.max_seq_len)")
    return kept


def pack(examples: Sequence[SFTExample], *, max_len: int, pad_id: int, packed: bool = True) -> Batch:
    """Rows of packed examples: packed_ids, packed_pos and loss_mask (1 on response tokens)."""
    rows: list[list[SFTExample]] = []
    used = 0
    for ex in examples:
        if len(ex) > max_len:
            raise ValueError(f"an example of {len(ex)} tokens does not fit max_len={max_len}")
        if not rows or not packed or used + len(ex) > max_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n_p, n = len(ex.prompt_ids), len(ex)
            ids[b, t:t + n] = torch.tensor(ex.prompt_ids + ex.response_ids)
            pos[b, t:t + n] = torch.arange(n)
            mask[b, t + n_p:t + n] = 1
            t += n
        pos[b, t:] = torch.arange(n, n + width - t)
    return Batch(packed_ids=ids, packed_pos=pos, loss_mask=mask)


class PackedNLL:
    """Token-mean negative log-likelihood of the response tokens of packed rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, mb: Batch, counts: GlobalCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp_BL = packed_logprobs(self.model, mb.packed_ids, mb.packed_pos)
        # A target at position 0 starts an example: never predicted (and always a prompt token).
        mask = mb.loss_mask[:, 1:].float() * (mb.packed_pos[:, 1:] != 0)
        nll = -(logp_BL * mask).sum() / counts.tokens
        return nll, {"nll": nll.detach(), "tokens": mask.sum().detach(),
                     "rows": torch.tensor(float(len(mb)))}


@torch.no_grad()
def held_out_nll(model: torch.nn.Module, examples: Sequence[SFTExample], *, max_len: int, pad_id: int,
                 rows_per_forward: int, device: torch.device) -> float:
    """Token-mean NLL of the response tokens of this rank's `examples`, over all ranks
    (collective: every rank calls it, possibly with no examples, and runs the same number of
    forwards, since an FSDP2 forward gathers parameters from every rank)."""
    model.eval()
    rows = pack(examples, max_len=max_len, pad_id=pad_id) if examples else None
    mine = -(-len(rows) // rows_per_forward) if rows is not None else 0
    forwards = int(dist.all_reduce_scalars({"n": float(mine)}, "max")["n"])
    idle = Batch(packed_ids=torch.full((1, 2), pad_id), packed_pos=torch.arange(2)[None],
                 loss_mask=torch.zeros((1, 2), dtype=torch.long))
    loss, total = PackedNLL(model), torch.zeros((), dtype=torch.float64)
    for k in range(forwards):
        if rows is not None and k < mine:
            start = k * rows_per_forward
            mb = rows.select(range(start, min(start + rows_per_forward, len(rows))))
        else:
            mb = idle  # keeps this rank in step with the others; contributes nothing
        total += loss(mb.to(device), GlobalCounts(tokens=1.0, seqs=1.0))[0].double().cpu()
    tokens = sum(len(e.response_ids) for e in examples)
    sums = dist.all_reduce_scalars({"nll": float(total), "tokens": float(tokens)})
    return sums["nll"] / max(sums["tokens"], 1.0)
