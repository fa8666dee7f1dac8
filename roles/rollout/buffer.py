"""The rollout buffer: partial rollouts and bounded staleness, owned by the rollout role.

With `algorithm.off_policy.max_staleness = K > 0`, the training stream's generation no longer
waits for its slowest sample. The buffer keeps groups in flight (the step's prompts plus more
drawn from the prompt stream, up to `in_flight` x the step's groups); each step the engine
continues every unfinished sample (prompt + the tokens it has) and pauses once enough groups
are complete; the step takes the oldest complete groups, and the rest stay, unfinished responses
with their tokens, per-token log-probs and the policy version of every token, to continue with
the next weights. A sample whose oldest token is more than K versions behind is dropped with its
group (`stale: drop`) or restarted from its prompt (`stale: regenerate`). A version is one weight
update the engine received (`Rollout.policy_version`). The buffer is part of the checkpoint.

Rollout log-probs of carried tokens are the behaviour policy's (the older weights that sampled
them): algorithms/off_policy.py corrects the objective with truncated importance weights
against them.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch

from core import dist
from core.batch import Batch
from core.data import PROMPT_FIELDS
from roles.rollout.engine import Completion, Request, SamplingParams, request_seed


@dataclass(slots=True)
class _Sample:
    seed: int
    budget: int
    tokens: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None

    def restart(self) -> None:
        self.tokens, self.logp, self.versions, self.finish = [], [], [], None


@dataclass(slots=True)
class _Group:
    prompt: list[int]
    meta: dict[str, Any]
    """group_ids, ground_truth, data_source, prompt_text of the prompt row."""
    samples: list[_Sample]

    @property
    def complete(self) -> bool:
        return all(s.finish is not None for s in self.samples)

    def oldest(self, default: int) -> int:
        return min((s.versions[0] for s in self.samples if s.versions), default=default)


Stale = Literal["drop", "regenerate"]


class RolloutBuffer:
    """The in-flight groups of one rank (configured by `algorithm.off_policy`, algorithms/base.py)."""

    def __init__(self, *, max_staleness: int, partial_rollouts: bool, in_flight: float, stale: Stale,
                 n: int, pad_token_id: int) -> None:
        if max_staleness < 1:
            raise ValueError("a rollout buffer needs max_staleness >= 1 (0 is synchronous: no buffer)")
        self.max_staleness, self.partial_rollouts, self.in_flight, self.stale = (
            max_staleness, partial_rollouts, in_flight, stale)
        self.n, self.pad = n, pad_token_id
        self.groups: deque[_Group] = deque()
        self.admitted = 0
        """Groups ever added (each sample's seed derives from it: resume-exact)."""

    # --- one training step's generation ---------------------------------------------------

    def generate(self, engine: Any, batch: Batch, sampling: SamplingParams, *, version: int,
                 prompts: Iterator[Batch] | None
                 ) -> tuple[Batch, list[Completion], dict[str, float], dict[str, float]]:
        """`len(batch)` complete groups (n samples each, adjacent) for this step, oldest first;
        returns (the prompt rows repeated n times, each sample's whole response as a
        Completion, metrics over all ranks, counts to sum over ranks). `engine` serves
        Requests; `prompts` (optional) tops the buffer up. Collective (the staleness figures)."""
        need = len(batch)
        self._add(batch, sampling)
        dropped = regenerated = 0
        while True:
            if prompts is not None:
                while len(self.groups) < math.ceil(self.in_flight * need):
                    self._add(next(prompts), sampling)
            d, r = self._enforce_staleness(version)
            dropped, regenerated = dropped + d, regenerated + r
            if self._ready() >= need:
                break
            self._run(engine, sampling, version, need)
            if self._ready() >= need or prompts is not None:
                continue
            raise RuntimeError("the rollout buffer cannot complete the step's groups (every sample of "
                               "the step's prompts dropped as stale)")
        chosen = self._take(need)
        carried = sum(s.finish is None for g in self.groups for s in g.samples)
        staleness = [version - (s.versions[0] if s.versions else version) for g in chosen for s in g.samples]
        sums = dist.all_reduce_scalars({"staleness": float(sum(staleness)), "samples": float(len(staleness))})
        metrics = {"off_policy/staleness_mean": sums["staleness"] / max(sums["samples"], 1.0),
                   "off_policy/staleness_max": dist.all_reduce_scalars({"m": float(max(staleness))}, "max")["m"]}
        counts = {"off_policy/carried_responses": float(carried), "off_policy/dropped": float(dropped),
                  "off_policy/regenerated": float(regenerated), "off_policy/buffer_groups": float(len(self.groups))}
        rows = _prompt_rows(chosen, self.pad, batch.prompt_ids.device)
        completions = [Completion(tuple(s.tokens), tuple(s.logp), s.finish)  # type: ignore[arg-type]
                       for g in chosen for s in g.samples]
        return rows.repeat_interleave(self.n), completions, metrics, counts

    def _add(self, batch: Batch, sampling: SamplingParams) -> None:
        for b in range(len(batch)):
            prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
            meta = {"group_ids": int(batch.group_ids[b]), "ground_truth": batch.ground_truth[b],
                    "data_source": batch.data_source[b], "prompt_text": batch.prompt_text[b]}
            group_seed = request_seed(sampling.seed, self.admitted)
            samples = [_Sample(seed=request_seed(group_seed, j), budget=sampling.max_new_tokens)
                       for j in range(self.n)]
            self.groups.append(_Group(prompt, meta, samples))
            self.admitted += 1

    def _enforce_staleness(self, version: int) -> tuple[int, int]:
        """Drop (or restart) what the bound no longer allows; returns (dropped groups, restarted samples)."""
        K, dropped, restarted = self.max_staleness, 0, 0
        keep: deque[_Group] = deque()
        for g in self.groups:
            if version - g.oldest(version) <= K:
                keep.append(g)
            elif self.stale == "drop":
                dropped += 1
            else:
                for s in g.samples:
                    if s.versions and version - s.versions[0] > K:
                        s.restart()
                        restarted += 1
                keep.append(g)
        self.groups = keep
        return dropped, restarted

    def _run(self, engine: Any, sampling: SamplingParams, version: int, need: int) -> None:
        """Continue every unfinished sample; pause once `need` groups are complete (with partial
        rollouts), else finish them all."""
        pending = [(g, s) for g in self.groups for s in g.samples if s.finish is None]
        requests = [Request(prompt=tuple(g.prompt), prefix=tuple(s.tokens),
                            sampling=dataclasses.replace(sampling, n=1, seed=s.seed, max_new_tokens=s.budget))
                    for g, s in pending]
        already = sum(g.complete for g in self.groups)
        members = [sum(1 for s in g.samples if s.finish is None) for g in self.groups]
        owner = [i for i, g in enumerate(self.groups) for s in g.samples if s.finish is None]

        def pause(done: Any) -> bool:
            left = list(members)
            for i in done:
                left[owner[i]] -= 1
            newly = sum(1 for k, g in enumerate(self.groups) if members[k] and left[k] == 0)
            return already + newly >= need

        out = engine.generate_requests(requests, pause=pause if self.partial_rollouts else None)
        for (_, s), c in zip(pending, out):
            s.tokens += c.tokens
            s.logp += c.logp
            s.versions += [version] * len(c.tokens)
            s.finish = None if c.finish_reason == "paused" else c.finish_reason

    def _ready(self) -> int:
        """Complete groups of distinct problems (what one step may take)."""
        return len({g.meta["group_ids"] for g in self.groups if g.complete})

    def _take(self, need: int) -> list[_Group]:
        """The `need` oldest complete groups, at most one per problem (group ids are problem ids:
        the same problem drawn again, in another epoch, waits for the next step)."""
        chosen: list[_Group] = []
        rest: deque[_Group] = deque()
        ids: set[int] = set()
        for g in self.groups:
            if g.complete and len(chosen) < need and g.meta["group_ids"] not in ids:
                chosen.append(g)
                ids.add(g.meta["group_ids"])
            else:
                rest.append(g)
        self.groups = rest
        return chosen

    # --- checkpoint -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"admitted": self.admitted, "groups": [{"prompt": g.prompt, "meta": g.meta,
                            "samples": [{"seed": s.seed, "budget": s.budget, "tokens": s.tokens, "logp": s.logp,
                                         "versions": s.versions, "finish": s.finish} for s in g.samples]}
                           for g in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.admitted = state["admitted"]
        self.groups = deque(_Group(g["prompt"], g["meta"], [_Sample(**s) for s in g["samples"]])
                            for g in state["groups"])


def _prompt_rows(groups: list[_Group], pad_token_id: int, device: torch.device) -> Batch:
    """The groups' prompt rows as a left-padded PROMPT_FIELDS batch."""
    width = max(1, max(len(g.prompt) for g in groups))
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    for i, g in enumerate(groups):
        if g.prompt:
            ids[i, width - len(g.prompt):] = torch.tensor(g.prompt)
            mask[i, width - len(g.prompt):] = 1
    fields: dict[str, Any] = {"prompt_ids": ids.to(device), "prompt_mask": mask.to(device),
                              "group_ids": torch.tensor([g.meta["group_ids"] for g in groups], device=device)}
    for name in ("ground_truth", "data_source", "prompt_text"):
        fields[name] = [g.meta[name] for g in groups]
    assert set(fields) == set(PROMPT_FIELDS)
    return Batch(**fields)
