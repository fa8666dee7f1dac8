"""DAPO: Decoupled clip and Dynamic sAmpling Policy Optimization (arXiv 2503.14476).

GRPO's group-normalised advantages with four changes:

* clip-higher: eps_low = 0.2, eps_high = 0.28, so low-probability tokens can still rise;
* dynamic sampling: groups whose rewards are all equal carry no gradient; drop them and keep
  generating more prompts until the step has its target number of informative groups (capped
  at `max_gen_rounds`), then trim to the target; every rank ends with the same number;
* token-level loss: `token-mean` over all tokens of the step, so long responses count fully;
* overlong reward shaping: +1 correct / -1 wrong, plus the soft overlong punishment over the
  last 20% of the budget (L_cache = 0.2 * L_max, as 4096 of 20480 in the paper); optionally
  overlong filtering (truncated responses leave the loss).

No KL term. Paper defaults: 512 prompts x 16, lr 1e-6, warm-up 10, wd 0.1, grad clip 1.0
(configs/dapo.yaml). Departure: the paper filters on accuracy; so does this (on `scores`).

    torchrun --nproc_per_node=2 -m launch.train --config configs/quickstart.yaml algorithm.name=dapo
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from algorithms import common
from algorithms.advantages import group_stats
from algorithms.base import register_algorithm
from algorithms.grpo import GRPOConfig, GRPOLoss, grpo_graph
from algorithms.losses import AggMode
from algorithms.shaping import RewardShaping
from core import dist
from core.batch import Batch
from core.config import at_least
from core.data import PROMPT_FIELDS
from core.graph import Graph, Node, Result


@dataclass(kw_only=True, slots=True)
class DAPOLoss(GRPOLoss):
    agg_mode: AggMode = "token-mean"
    eps_high: float = 0.28
    kl_coef: float = 0.0


@dataclass(kw_only=True, slots=True)
class DAPORewards(RewardShaping):
    correct: float = 1.0
    wrong: float = -1.0
    overlong_buffer_frac: float = 0.2
    overlong_penalty: float = 1.0


@dataclass(kw_only=True, slots=True)
class DAPOConfig(GRPOConfig):
    name: str = "dapo"
    loss: DAPOLoss = field(default_factory=DAPOLoss)
    rewards: DAPORewards = field(default_factory=DAPORewards)
    dynamic_sampling: bool = True
    max_gen_rounds: int = 3
    """Generation rounds per step at most; then uniform groups fill the gap (and are counted)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "max_gen_rounds")


def informative(scores_B: torch.Tensor, group_ids_B: torch.Tensor) -> torch.Tensor:
    """[B] bool: the sample's group has scores that are not all equal."""
    _, std_B, _ = group_stats(scores_B, group_ids_B)
    return std_B > 0


def dynamic_sample(batch: Batch, *, rollout: Any, reward: Any, prompts: Any, max_rounds: int) -> Result:
    """Generate and score until the step has as many informative groups as prompts (over all
    ranks) or max_rounds is reached; rebalance so every rank gets the same number of groups."""
    target, world, device = len(batch), dist.info().world_size, batch.prompt_ids.device
    kept, spare, rounds, first_frac, n_local = [], [], 0, None, 0
    counts: dict[str, float] = {}
    generated: dict[str, list[float]] = {}
    while True:
        rounds += 1
        gen = rollout.generate(batch, prompts=prompts)
        for key, value in gen.metrics.items():
            generated.setdefault(key, []).append(value)
        for key, value in gen.counts.items():
            counts[key] = counts.get(key, 0.0) + value
        out = gen.value
        scored = reward.score(out)
        for key, value in scored.counts.items():  # every round's scoring counts, summed
            counts[key] = counts.get(key, 0.0) + value
        out = out.with_fields(scores=scored.value).to("cpu")
        keep = informative(out.scores, out.group_ids)
        first_frac = float(keep.float().mean()) if first_frac is None else first_frac
        kept.append(out.select(keep.nonzero()[:, 0]))
        spare.append(out.select((~keep).nonzero()[:, 0]))
        n_local += int(keep.sum()) // rollout.cfg.n
        n_groups = dist.all_reduce_scalars({"n": float(n_local)})["n"]
        if n_groups >= target * world or rounds >= max_rounds:
            break
        batch = next(prompts).to(device)
    mine, filled = _rebalance(Batch.concat(kept), Batch.concat(spare), groups_per_rank=target,
                              n=rollout.cfg.n)
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/first_round_informative_frac": first_frac,
               "dynamic_sampling/filled_uniform_groups": float(filled)}
    metrics |= {key: sum(values) / len(values) for key, values in generated.items()}  # mean over rounds
    return Result(mine.to(device), metrics=metrics, counts=counts)


def _rebalance(kept: Batch, spare: Batch, *, groups_per_rank: int, n: int) -> tuple[Batch, int]:
    """Every rank's informative groups, in rank order, then uniform ones if too few; rank r
    takes groups [r * groups_per_rank, (r + 1) * groups_per_rank) of that order. Only the groups
    that change rank travel (one gather of their batches); the rest stay where they are."""
    info = dist.info()
    counts = dist.all_gather_objects((len(kept) // n, len(spare) // n))
    order = ([(r, "kept", i) for r, (k, _) in enumerate(counts) for i in range(k)]
             + [(r, "spare", i) for r, (_, u) in enumerate(counts) for i in range(u)])
    slots = order[:groups_per_rank * info.world_size]
    home = {item: pos // groups_per_rank for pos, item in enumerate(slots)}
    local = {"kept": kept, "spare": spare}

    def group(item: tuple[int, str, int]) -> Batch:
        return local[item[1]].select(range(item[2] * n, (item[2] + 1) * n))

    leaving = [(item, group(item)) for item in slots if item[0] == info.rank and home[item] != info.rank]
    arrived = {item: b for part in dist.all_gather_objects(leaving) for item, b in part if home[item] == info.rank}
    mine = Batch.concat([group(item) if item[0] == info.rank else arrived[item]
                         for item in slots[info.rank * groups_per_rank:(info.rank + 1) * groups_per_rank]])
    # Groups from several rounds and ranks: renumber so ids are unique within the rank.
    ids = torch.arange(groups_per_rank).repeat_interleave(n) + info.rank * groups_per_rank
    n_kept = sum(k for k, _ in counts)
    filled = max(0, groups_per_rank * info.world_size - n_kept)
    return mine.with_fields(group_ids=ids), filled


def dapo_sampling(c: DAPOConfig) -> list[Node]:
    if not c.dynamic_sampling:
        return [common.generate(), common.score()]
    return [Node("dynamic_sampling", dynamic_sample, PROMPT_FIELDS, common.GENERATED + ("scores",),
                 kwargs={"max_rounds": c.max_gen_rounds}, needs=("rollout", "reward", "prompts"),
                 batch_in=True)]


@register_algorithm("dapo", DAPOConfig)
def build_graph(cfg: DAPOConfig) -> Graph:
    return grpo_graph("dapo", cfg, sampling=dapo_sampling(cfg))
