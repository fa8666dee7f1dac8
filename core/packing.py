"""Sequence packing, for SFT and RL alike, and the micro-batches the training loops run.

One mechanism serves both: sequences are laid end to end in rows, position ids restart at 0 at
every sequence, and the model runs with no attention mask, so transformers attends only within
a sequence (a block-diagonal causal mask; the variable-length kernels use the position ids
directly). `lay_out` places the sequences; padding at the end of a row continues the row's last
sequence (it attends only backwards, so no real token sees it):

    row        p p p r r e | p p r e | pad pad
    positions  0 1 2 3 4 5 | 0 1 2 3 | 4   5
    loss_mask  0 0 0 1 1 1 | 0 0 1 1 | 0   0        (SFT: response tokens and EOS are the targets)

SFT (`pack`, `PackedNLL`): examples in the order given (no reordering, so a step's content does
not depend on lengths) in rows of at most `max_len` tokens; the loss is the token mean over every
response token of the step on every rank (each micro-batch returns its share, core/optim.py).

RL (`pack_samples`): a micro-batch of the padded layout of core/batch.py (left-padded prompts,
right-padded responses) becomes rows holding only its real tokens: one row with a
variable-length attention kernel, else rows as wide as its longest sample, filled longest
first. Log-probs, entropies and values are computed at the positions that predict response
tokens and scattered back to the micro-batch's [B, R] layout, zero at padding, so the graph and
the losses see exactly what the padded pass gives them (tests/test_packing_rl.py).

`micro_batches` cuts one optimizer step (or one no-grad pass) into the micro-batches of
`core.batch.plan_micro_batches`, packed or padded, before the loop runs, so the loop itself
never waits for the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from core import dist
from core.batch import Batch, GlobalCounts, declare_field, loss_mask
from core.microbatch import SampleSizes, plan_micro_batches, sample_sizes
from core.models import (
    PromptGroups,
    packed_logprobs,
    packed_token_logprobs,
    prompt_groups,
    shared_prompt_tokens,
    token_logprobs,
)

logger = logging.getLogger(__name__)

declare_field("packed_ids", shape="B,L", doc="token ids of packed (prompt, response) examples, right-padded")
declare_field("packed_pos", shape="B,L", doc="position ids, restarting at 0 at every packed example")


# --- The shared layout ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """Where `lay_out` put each sequence: [rows, width] slots, flattened row-major."""
    width: int
    rows: int
    start: list[int]
    """Flat slot of each sequence's first token."""
    slot_N: torch.Tensor
    """[N] flat slot of every token, sequences in order, tokens in order (long, CPU)."""
    pos_BL: torch.Tensor
    """[rows, width] position ids (long, CPU)."""

    def scatter(self, values_N: torch.Tensor, fill: float | int) -> torch.Tensor:
        """[rows, width]: values_N at their slots, `fill` elsewhere."""
        out = values_N.new_full((self.rows * self.width,), fill)
        return out.index_copy(0, self.slot_N.to(values_N.device), values_N).view(self.rows, self.width)


def lay_out(lengths: Sequence[int], rows: Sequence[Sequence[int]], width: int) -> Layout:
    """Sequences (of `lengths`) end to end in `rows` (sequence indices, in row order) of `width`
    slots; positions restart at 0 per sequence and padding continues the row's last sequence."""
    start = [0] * len(lengths)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            start[i] = r * width + t
            pos[r, t:t + lengths[i]] = torch.arange(lengths[i])
            t += lengths[i]
        if t > width:
            raise ValueError(f"row {r} holds {t} tokens, more than its width {width}")
        last = lengths[row[-1]] if row else 0
        pos[r, t:] = torch.arange(last, last + width - t)
    n = torch.tensor(lengths, dtype=torch.long)
    first = torch.tensor(start, dtype=torch.long)
    offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return Layout(width=width, rows=len(rows), start=start,
                  slot_N=torch.repeat_interleave(first, n) + offset, pos_BL=pos)


# --- SFT ------------------------------------------------------------------------------------


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


def in_order_rows(lengths: Sequence[int], *, max_len: int, packed: bool = True) -> list[list[int]]:
    """Sequences in the order given, each row filled until the next one does not fit
    (`packed=False`: one sequence per row)."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit max_len={max_len}")
        if not rows or not packed or used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack(examples: Sequence[SFTExample], *, max_len: int, pad_id: int, packed: bool = True) -> Batch:
    """Rows of packed examples: packed_ids, packed_pos and loss_mask (1 on response tokens)."""
    lengths = [len(ex) for ex in examples]
    rows = in_order_rows(lengths, max_len=max_len, packed=packed)
    layout = lay_out(lengths, rows, max(sum(lengths[i] for i in row) for row in rows))
    tokens = torch.tensor([t for ex in examples for t in ex.prompt_ids + ex.response_ids], dtype=torch.long)
    targets = torch.tensor([m for ex in examples for m in [0] * len(ex.prompt_ids) + [1] * len(ex.response_ids)],
                           dtype=torch.long)
    return Batch(packed_ids=layout.scatter(tokens, pad_id), packed_pos=layout.pos_BL,
                 loss_mask=layout.scatter(targets, 0))


class PackedNLL:
    """Token-mean negative log-likelihood of the response tokens of packed rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, mb: Batch, counts: GlobalCounts, packed: PackedSamples | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`packed` is always None here: SFT rows are packed already (core/optim.py's MicroLoss)."""
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


# --- RL -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackedSamples:
    """A padded micro-batch's real tokens in packed rows, and where its response tokens are."""
    ids_BL: torch.Tensor
    pos_BL: torch.Tensor
    keep_K: torch.Tensor
    """Columns whose outputs are needed (they predict a response token in some row)."""
    pick_N: torch.Tensor
    """[N] index into the flattened [rows * K] kept outputs, one per response token."""
    slot_N: torch.Tensor
    """[N] flat slot (row * width + column) of the position predicting each response token."""
    target_N: torch.Tensor
    """[N] index into the flattened [B * R] response layout of each response token."""
    targets_N: torch.Tensor
    """[N] the response token ids."""
    shape: tuple[int, int]
    """(B, R) of the padded micro-batch."""

    def to_samples(self, values_N: torch.Tensor) -> torch.Tensor:
        """[B, R]: values_N at their response tokens, 0 at padding (differentiable)."""
        B, R = self.shape
        return values_N.new_zeros(B * R).index_copy(0, self.target_N, values_N).view(B, R)


def pack_samples(mb: Batch, sizes: SampleSizes, *, one_row: bool, pad_id: int = 0) -> PackedSamples:
    """Pack a padded micro-batch (cut to its widths; `sizes` are its samples' sizes): one row, or
    rows as wide as its longest sample, filled longest sample first into the first row with room."""
    B, P = mb.prompt_ids.shape
    R = mb.response_ids.shape[1]
    lengths = [sizes.tokens(i) for i in range(B)]
    if one_row:
        rows, width = [list(range(B))], sum(lengths)
    else:
        width, rows = max(lengths), []
        room: list[int] = []
        for i in sorted(range(B), key=lambda i: (-lengths[i], i)):
            r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if r is None:
                rows.append([])
                room.append(width)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= lengths[i]
    layout = lay_out(lengths, rows, width)
    src: list[int] = []
    pred: list[int] = []
    target: list[int] = []
    for i in range(B):
        n_p, n_r = sizes.prompt[i], sizes.response[i]
        src += range(i * (P + R) + P - n_p, i * (P + R) + P + n_r)
        pred += range(layout.start[i] + n_p - 1, layout.start[i] + n_p - 1 + n_r)
        target += range(i * R, i * R + n_r)
    device = mb.prompt_ids.device
    flat = torch.cat([mb.prompt_ids, mb.response_ids], dim=1).reshape(-1)
    ids = layout.scatter(flat[torch.tensor(src, dtype=torch.long, device=device)], pad_id)
    slot = torch.tensor(pred, dtype=torch.long)
    cols = slot % width
    keep = slot if one_row else torch.unique(cols)  # one row: exactly the predicting positions
    pick = (torch.arange(len(pred)) if one_row
            else (slot // width) * len(keep) + torch.searchsorted(keep, cols))
    target_t = torch.tensor(target, dtype=torch.long, device=device)
    return PackedSamples(ids_BL=ids, pos_BL=layout.pos_BL.to(device), keep_K=keep.to(device),
                         pick_N=pick.to(device), slot_N=slot.to(device), target_N=target_t,
                         targets_N=mb.response_ids.reshape(-1)[target_t], shape=(B, R))


def response_logprobs(model: torch.nn.Module, mb: Batch, packed: PackedSamples | None, *,
                      temperature: float = 1.0, with_entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`core.models.token_logprobs` of `mb`, computed on its packed rows when `packed` is given
    (else padded; each distinct prompt once where `mb` carries `prompt_group`): (logp_BR,
    entropy_BR or None), float32, 0 at padding."""
    if packed is None:
        return token_logprobs(model, mb, temperature=temperature, with_entropy=with_entropy)
    out_N2 = packed_token_logprobs(model, packed.ids_BL, packed.pos_BL, keep_K=packed.keep_K, pick_N=packed.pick_N,
                                   targets_N=packed.targets_N, temperature=temperature, with_entropy=with_entropy)
    logp_BR = sampled_only(mb, packed.to_samples(out_N2[:, 0]))
    return logp_BR, sampled_only(mb, packed.to_samples(out_N2[:, 1])) if with_entropy else None


def sampled_only(mb: Batch, x_BR: torch.Tensor) -> torch.Tensor:
    """x_BR with 0 at a multi-turn sample's observation tokens (packed rows hold them as real
    tokens; outputs, as in the padded layout, exist only at sampled tokens)."""
    if "observation_mask" not in mb:
        return x_BR
    return torch.where(mb.response_mask.bool(), x_BR, torch.zeros((), dtype=x_BR.dtype, device=x_BR.device))


# --- Micro-batches --------------------------------------------------------------------------


class MicroBatching(Protocol):
    """The config fields that say how a role cuts its batches (Actor/Critic/Reference.Config)."""
    micro_batch_size: int
    max_tokens_per_micro_batch: int | None
    packing: bool


@dataclass(frozen=True, slots=True)
class MicroBatch:
    batch: Batch
    """The samples in the padded layout, cut to their widths (what losses see)."""
    packed: PackedSamples | None
    """The same samples packed (packing on), else None."""
    index: torch.Tensor
    """Their rows in the batch that was cut (long, on the batch's device)."""
    idle: bool = False
    """A stand-in that keeps this rank in step with the others: this rank's first sample with an
    empty loss mask; its loss is multiplied by 0 and its outputs and metrics are dropped."""


def micro_batches(batch: Batch, spec: MicroBatching, *, one_row: bool = False, share_prompts: bool = False,
                  sizes: SampleSizes | None = None, sizes_by_rank: Sequence[SampleSizes] | None = None
                  ) -> list[MicroBatch]:
    """`batch` cut into the micro-batches of `plan_micro_batches`, built ahead of the loop.
    Every rank's sizes are gathered (a collective) unless given.

    share_prompts (a role whose forward runs each distinct prompt once, core.models.
    shared_prompt_logits): a micro-batch takes that layout (padded, with the field
    `prompt_group`) where it runs fewer tokens than the other one (packed, or padded), summed over
    the ranks, so every rank runs the same forwards (a collective: one gather of token counts);
    that is where samples share prompts and their responses are of similar length."""
    sizes = sizes if sizes is not None else sample_sizes(batch)
    everyone = sizes_by_rank if sizes_by_rank is not None else dist.all_gather_objects(sizes)
    rl = "prompt_mask" in batch and "response_mask" in batch
    if not rl and spec.max_tokens_per_micro_batch is not None:
        raise ValueError("max_tokens_per_micro_batch applies to RL batches (prompts and responses); "
                         "packed SFT rows are cut by micro_batch_size")
    packing = spec.packing and rl
    if packing:
        check_packable(sizes)
    if len(batch) == 0:
        raise ValueError("a rank has no samples in this batch; every rank needs at least one "
                         "(each runs the same forwards)")
    plan = plan_micro_batches(everyone, dist.info().rank if len(everyone) > 1 else 0,
                              micro_batch_size=spec.micro_batch_size,
                              max_tokens=spec.max_tokens_per_micro_batch, packed=packing)
    cuts = [_cut(batch, sizes, rows or [0], idle=not rows) for rows in plan]
    shared = _shared_layouts(cuts, packing=packing) if share_prompts and rl else [None] * len(cuts)
    return [MicroBatch(batch=mb if groups is None else mb.with_fields(prompt_group=groups.inverse),
                       packed=pack_samples(mb, mine, one_row=one_row) if packing and groups is None else None,
                       index=index, idle=idle)
            for (mb, mine, index, idle), groups in zip(cuts, shared)]


def _cut(batch: Batch, sizes: SampleSizes, rows: list[int], *, idle: bool
         ) -> tuple[Batch, SampleSizes, torch.Tensor, bool]:
    """The padded micro-batch of `rows`, cut to its widths, with its sizes and row index."""
    mine = sizes.select(rows)
    rl = "prompt_mask" in batch and "response_mask" in batch
    mb = (batch.cut(rows, prompt_width=max(mine.prompt_span), response_width=max(mine.response_span)) if rl
          else batch.select(rows))
    if idle:
        mb = mb.with_fields(loss_mask=torch.zeros_like(loss_mask(mb)))
    device = next(v.device for _, v in mb.items() if isinstance(v, torch.Tensor))
    return mb, mine, torch.tensor(rows, dtype=torch.long, device=device), idle


def _shared_layouts(cuts: Sequence[tuple[Batch, SampleSizes, torch.Tensor, bool]], *, packing: bool
                    ) -> list[PromptGroups | None]:
    """Per micro-batch: its prompt groups where running each prompt once takes fewer token slots
    than the other layout, summed over the ranks (the same choice on every rank), else None."""
    local = []
    for mb, sizes, _, _ in cuts:
        groups = prompt_groups(mb)
        (B, P), R = mb.prompt_ids.shape, mb.response_ids.shape[1]
        other = sum(sizes.tokens(i) for i in range(B)) if packing else B * (P + R)
        local.append((groups, shared_prompt_tokens(len(groups.first), B, P, R), other))
    everyone = dist.all_gather_objects([(s, o) for _, s, o in local])
    return [groups if sum(r[i][0] for r in everyone) < sum(r[i][1] for r in everyone) else None
            for i, (groups, _, _) in enumerate(local)]


def check_packable(sizes: SampleSizes) -> None:
    """Packing keeps only real tokens, in order: prompts must be left-padded and responses
    right-padded without holes, and every prompt must hold a token (it predicts the first
    response token)."""
    if not sizes.contiguous():
        raise ValueError("packing needs left-padded prompts and right-padded responses without holes in "
                         "prompt_mask and response_mask (plus observation_mask in a multi-turn sample); "
                         "set packing=false for this batch layout")
    if any(n == 0 for n in sizes.prompt):
        raise ValueError("packing needs a non-empty prompt in every sample")


def map_micro_batches(batch: Batch, spec: MicroBatching, fn: Callable[[Batch, PackedSamples | None], torch.Tensor],
                      *, one_row: bool = False, share_prompts: bool = False) -> torch.Tensor:
    """[B, R]: `fn` (a no-grad [b, r] pass over one micro-batch, e.g. log-probs or values) over
    `batch`'s micro-batches, re-assembled in the batch's order at its full response width.
    Collective: every rank runs the same number of forwards."""
    B, R = batch.response_ids.shape
    out: torch.Tensor | None = None
    for mb in micro_batches(batch, spec, one_row=one_row, share_prompts=share_prompts):
        part = fn(mb.batch, mb.packed)
        if out is None:
            out = part.new_zeros((B, R))
        if not mb.idle:
            out[mb.index, :part.shape[1]] = part
    assert out is not None
    return out

