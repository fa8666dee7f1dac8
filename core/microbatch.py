"""Micro-batch plans: how an optimizer step's samples are split into micro-batches.

An optimizer step's samples are split into micro-batches on the host, from sizes read off the
device once, before the forward/backward loop starts (so the loop never waits for the device).
Every rank sees every rank's sizes and computes the same plan, so all ranks run the same number
of micro-batches: an FSDP2 forward and backward are collectives.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from core.batch import Batch, GlobalCounts, loss_mask, response_tokens


@dataclass(frozen=True, slots=True)
class SampleSizes:
    """Per-sample sizes of one rank's batch, on the host (lists of length B)."""
    prompt: list[int]
    """Real prompt tokens (prompt_mask summed)."""
    response: list[int]
    """Real response tokens (`response_tokens` summed: sampled and observation tokens)."""
    prompt_span: list[int]
    """Columns from the first real prompt token to the end (what `trim` keeps)."""
    response_span: list[int]
    """Columns up to the last real response token."""
    loss_tokens: list[float]
    """Tokens in the loss (`loss_mask` or response_mask summed)."""
    budget: list[float] | None
    """`response_budget` per sample; None when the batch does not carry it."""

    def __len__(self) -> int:
        return len(self.loss_tokens)

    def select(self, rows: Sequence[int]) -> SampleSizes:
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return SampleSizes(prompt=pick(self.prompt), response=pick(self.response),
                           prompt_span=pick(self.prompt_span), response_span=pick(self.response_span),
                           loss_tokens=pick(self.loss_tokens),
                           budget=None if self.budget is None else pick(self.budget))

    def tokens(self, i: int) -> int:
        """Sample i's tokens in a packed row (prompt + response)."""
        return self.prompt[i] + self.response[i]

    def contiguous(self) -> bool:
        """Every prompt is left-padded and every response right-padded without holes (the layout
        core/batch.py documents; packing relies on it)."""
        return self.prompt == self.prompt_span and self.response == self.response_span


def sample_sizes(batch: Batch) -> SampleSizes:
    """The sizes of `batch`'s samples, read from the device in one transfer. A batch of SFT rows
    (no prompt/response fields) has zero prompt and response sizes."""
    mask = loss_mask(batch) if ("loss_mask" in batch or "response_mask" in batch) else None
    cols = []
    if "prompt_mask" in batch and "response_mask" in batch:
        pm, rm = batch.prompt_mask.bool(), response_tokens(batch).bool()
        P, R = pm.shape[1], rm.shape[1]
        # first real prompt column / last real response column (argmax picks the first max)
        p_span = torch.where(pm.any(-1), P - pm.long().argmax(-1), 0)
        r_span = torch.where(rm.any(-1), R - rm.flip(-1).long().argmax(-1), 0)
        cols += [pm.sum(-1), rm.sum(-1), p_span, r_span]
    if mask is not None:
        cols.append(mask.sum(-1))
    if "response_budget" in batch:
        cols.append(batch.response_budget)
    n = len(batch)
    table = (torch.stack([c.to(torch.float64) for c in cols], dim=1).cpu().tolist() if cols and n
             else [[] for _ in range(n)])
    has_seq = "prompt_mask" in batch and "response_mask" in batch
    at = 4 if has_seq else 0
    ints = lambda j: [int(r[j]) for r in table] if has_seq else [0] * n  # noqa: E731
    return SampleSizes(prompt=ints(0), response=ints(1), prompt_span=ints(2), response_span=ints(3),
                       loss_tokens=[float(r[at]) for r in table] if mask is not None else [0.0] * n,
                       budget=[float(r[-1]) for r in table] if "response_budget" in batch else None)


def step_counts(sizes_by_rank: Sequence[SampleSizes]) -> GlobalCounts:
    """`global_counts` of an optimizer step from every rank's sizes (no collective): the same
    values, summed on the host."""
    tokens = sum(t for s in sizes_by_rank for t in s.loss_tokens)
    seqs = sum(1 for s in sizes_by_rank for t in s.loss_tokens if t > 0)
    budgets = [max(s.budget) if s.budget else 0.0 for s in sizes_by_rank if s.budget is not None]
    return GlobalCounts(tokens=max(tokens, 1.0), seqs=max(float(seqs), 1.0), budget=max(budgets, default=0.0))


def micro_batch_cost(sizes: SampleSizes, rows: Sequence[int], *, packed: bool) -> int:
    """Tokens a forward over `rows` processes: their prompt + response tokens when packed; the
    trimmed [rows, prompt width + response width] rectangle when padded."""
    if not rows:
        return 0
    if packed:
        return sum(sizes.tokens(i) for i in rows)
    return len(rows) * (max(sizes.prompt_span[i] for i in rows) + max(sizes.response_span[i] for i in rows))


def plan_micro_batches(sizes_by_rank: Sequence[SampleSizes], rank: int, *, micro_batch_size: int,
                       max_tokens: int | None, packed: bool) -> list[list[int]]:
    """This rank's micro-batches (row indices into its batch; `[]` is an idle micro-batch that
    contributes nothing), the same number on every rank.

    Without a token budget: consecutive runs of `micro_batch_size` samples, as many micro-batches
    as the rank with the most samples needs.

    With `max_tokens`, the balancing rule: k is the smallest number of micro-batches into which
    *every* rank can split its samples with each micro-batch within the budget (a sample over the
    budget goes alone), found from every rank's sizes, so every rank computes the same k. Each
    rank then splits its own samples (no sample moves between ranks) into k micro-batches of
    near-equal cost and runs them costliest first, so the i-th micro-batch of every rank holds
    about as many tokens as the others' and no rank waits long for another's. Cost is
    `micro_batch_cost`: packed, the tokens (largest sample first into the least-filled
    micro-batch); padded, the rectangle (the samples sorted by width, cut into k runs with the
    smallest largest rectangle, so similar lengths share a micro-batch).
    """
    if max_tokens is None:
        plans = [[list(range(i, min(i + micro_batch_size, len(s)))) for i in range(0, len(s), micro_batch_size)]
                 for s in sizes_by_rank]
    elif packed:
        lower = max(math.ceil(sum(s.tokens(i) for i in range(len(s))) / max_tokens) for s in sizes_by_rank)
        for k in range(max(1, lower), max(len(s) for s in sizes_by_rank) + 1):
            plans = [_least_filled(s, k) for s in sizes_by_rank]
            if all(len(b) <= 1 or micro_batch_cost(s, b, packed=True) <= max_tokens
                   for s, plan in zip(sizes_by_rank, plans) for b in plan):
                break
    else:
        k = max(len(_width_runs(s, max_tokens)) for s in sizes_by_rank)
        plans = [_balanced_runs(s, k, max_tokens) for s in sizes_by_rank]
    k = max(len(p) for p in plans)
    mine = [b for b in plans[rank] if b]
    if max_tokens is not None:
        mine = sorted((sorted(b) for b in mine),
                      key=lambda b: (-micro_batch_cost(sizes_by_rank[rank], b, packed=packed), b))
    return mine + [[] for _ in range(k - len(mine))]


def _least_filled(sizes: SampleSizes, k: int) -> list[list[int]]:
    """k micro-batches of near-equal token counts: each sample, largest first, into the
    least-filled one."""
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, b) for b in range(k)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes.tokens(i), i)):
        filled, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (filled + sizes.tokens(i), b))
    return bins


def _width_runs(sizes: SampleSizes, limit: int) -> list[list[int]]:
    """The samples sorted by width (widest first), cut greedily into runs whose padded rectangle
    stays within `limit` (a sample over it alone): the fewest such runs."""
    runs: list[list[int]] = []
    p = r = 0
    for i in sorted(range(len(sizes)), key=lambda i: (-(sizes.prompt_span[i] + sizes.response_span[i]), i)):
        p2, r2 = max(p, sizes.prompt_span[i]), max(r, sizes.response_span[i])
        if not runs or (len(runs[-1]) + 1) * (p2 + r2) > limit:
            runs.append([])
            p2, r2 = sizes.prompt_span[i], sizes.response_span[i]
        runs[-1].append(i)
        p, r = p2, r2
    return runs


def _balanced_runs(sizes: SampleSizes, k: int, limit: int) -> list[list[int]]:
    """At most k width runs with the smallest largest rectangle (binary search on the limit;
    k runs fit within `limit`)."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_width_runs(sizes, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    return _width_runs(sizes, lo)
