"""Evaluation: one generate-and-score routine, with one definition of a correct sample, behind
held-out accuracy during training, benchmarks (launch.eval) and the difficulty curriculum's
pass-rate probe.

A sample is correct when its score is 1 (`is_correct`: the scorer's "1 = correct"; a partial
score, e.g. some of a program's tests passing, is not). Held-out accuracy is the fraction of
correct greedy samples; a pass rate is the fraction of correct samples of one problem; pass@k,
avg@k and maj@k count correct samples too. Evaluation never drops a problem: a prompt longer
than data.max_prompt_len is an error.

Benchmarks: n samples per problem, scored like training, summarised as pass@k, avg@k and maj@k,
optionally over several rounds of "multi-round thinking".

Definitions (ALGORITHMS.md, "Evaluation"), for one problem with n samples of which c are correct:

* pass@k = 1 - C(n - c, k) / C(n, k), the unbiased estimate, computed in the stable product
  form 1 - prod_{i = n-c+1}^{n} (1 - k / i); averaged over problems.
* avg@k = the mean correctness of the first k samples.
* maj@k = the correctness of the most common extracted final answer among the first k samples.
  Samples without an extractable answer do not vote. Ties go to the answer that appears first
  (lowest sample index) among the tied ones, so the result is deterministic. No vote: 0.

Multi-round thinking: round r + 1 asks the original question again followed by "The
assistant's previous answer is: <answer> {round r's final answer} </answer>, and please
re-answer."; each of the n samples continues its own chain; only the final answer carries over.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from core import dist
from core.batch import Batch
from core.data import PromptDataset, PromptFormat, PromptRow, collate_prompts, render_prompt, shard_rows
from roles.reward import Reward
from roles.rollout import Rollout
from roles.rollout.engine import SamplingParams

logger = logging.getLogger(__name__)

REANSWER = "\n\nThe assistant's previous answer is: <answer> {answer} </answer>, and please re-answer."


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct among n samples."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    return sum(correct[:k]) / k


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Correctness of the majority answer among the first k samples (ties: earliest answer)."""
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers[:k] if a is not None and votes[a] == top)
    return float(correct[answers.index(winner)])


@dataclass(frozen=True, slots=True)
class Sample:
    benchmark: str
    problem_id: str
    sample: int
    round: int
    response: str
    answer: str | None
    correct: bool

    def as_row(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "problem_id": self.problem_id, "sample": self.sample,
                "round": self.round, "response": self.response, "answer": self.answer,
                "correct": self.correct}


def summarize(samples: Sequence[Sample], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """{benchmark[/round r for r > 1]: {"pass@k": ..., "avg@k": ..., "maj@k": ..., "n_problems"}}."""
    groups: dict[tuple[str, int], dict[str, list[Sample]]] = {}
    for s in samples:
        groups.setdefault((s.benchmark, s.round), {}).setdefault(s.problem_id, []).append(s)
    out: dict[str, dict[str, float]] = {}
    for (bench, rnd), problems in sorted(groups.items()):
        table: dict[str, float] = {"n_problems": float(len(problems))}
        chains = [sorted(p, key=lambda s: s.sample) for p in problems.values()]
        for k in ks:
            if k > min(len(c) for c in chains):
                continue
            table[f"pass@{k}"] = _mean(pass_at_k(len(c), sum(s.correct for s in c), k) for c in chains)
            table[f"avg@{k}"] = _mean(avg_at_k([s.correct for s in c], k) for c in chains)
            table[f"maj@{k}"] = _mean(maj_at_k([s.answer for s in c], [s.correct for s in c], k) for c in chains)
        out[bench if rnd == 1 else f"{bench}/round_{rnd}"] = table
    return out


def _mean(values: Any) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def is_correct(scores_B: torch.Tensor) -> torch.Tensor:
    """[B] bool: the sample is correct (score 1; the scorers' scores lie in [0, 1])."""
    return scores_B >= 1.0 - 1e-6


def generate_and_score(rows: Sequence[PromptRow], *, rollout: Rollout, reward: Reward, tokenizer: Any,
                       sampling: SamplingParams, batch_size: int, max_prompt_len: int, seed: int,
                       progress: str | None = None) -> Iterator[tuple[int, Batch, torch.Tensor]]:
    """This rank's `rows`, batch_size prompts at a time, each sampled `sampling.n` times and
    scored: yields (offset of the chunk in rows, the generated batch, is_correct [chunk x n]).
    The chunk at offset `start` samples with seed + start, so results do not depend on the rank
    count's effect on other chunks."""
    device = dist.info().device
    show = tqdm(total=len(rows), desc=progress, disable=progress is None or not dist.info().is_main, leave=False)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = prompt_batch(chunk, tokenizer, max_prompt_len).to(device)
        gen = rollout.generate(batch, sampling.with_seed(seed + start)).value
        yield start, gen, is_correct(reward.score(gen).value)
        show.update(len(chunk))
    show.close()


@torch.no_grad()
def held_out_accuracy(rows: Sequence[PromptRow], *, rollout: Rollout, reward: Reward, tokenizer: Any,
                      batch_size: int, max_new_tokens: int, max_prompt_len: int) -> dict[str, float]:
    """{"eval/accuracy", "eval/n"}: greedy, one sample per problem, every rank's share summed
    (collective)."""
    info = dist.info()
    mine = shard_rows(rows, info.rank, info.world_size)
    sampling = rollout.sampling(temperature=0.0, n=1, max_new_tokens=max_new_tokens)
    correct = sum(float(ok.sum()) for _, _, ok in generate_and_score(
        mine, rollout=rollout, reward=reward, tokenizer=tokenizer, sampling=sampling,
        batch_size=batch_size, max_prompt_len=max_prompt_len, seed=0))
    total = dist.all_reduce_scalars({"correct": correct, "n": float(len(mine))})
    return {"eval/accuracy": total["correct"] / max(total["n"], 1.0), "eval/n": total["n"]}


@torch.no_grad()
def probe_pass_rates(dataset: PromptDataset, *, rollout: Rollout, reward: Reward, tokenizer: Any, n: int,
                     batch_size: int, max_prompt_len: int, seed: int) -> list[float]:
    """The current policy's pass rate of every prompt of `dataset` from n samples each (each
    rank probes its share; seeded, so a resumed run probes identically). Collective."""
    info = dist.info()
    mine = list(range(info.rank, len(dataset), info.world_size))
    rates: dict[int, float] = {}
    sampling = rollout.sampling(n=n)
    for start, _, ok in generate_and_score([dataset.rows[i] for i in mine], rollout=rollout, reward=reward,
                                           tokenizer=tokenizer, sampling=sampling, batch_size=batch_size,
                                           max_prompt_len=max_prompt_len, seed=seed):
        chunk = mine[start:start + batch_size]
        rates.update(zip(chunk, ok.float().reshape(len(chunk), n).mean(-1).tolist()))
    merged = {k: v for part in dist.all_gather_objects(rates) for k, v in part.items()}
    logger.info("difficulty probe: %d prompts x %d samples; %d with 0 < pass rate < 1", len(merged), n,
                sum(0 < p < 1 for p in merged.values()))
    return [merged[i] for i in range(len(dataset))]


def run_benchmark(name: str, rows: Sequence[PromptRow], *, rollout: Rollout, reward: Reward, tokenizer: Any,
                  fmt: PromptFormat, n: int, rounds: int, batch_size: int, max_prompt_len: int,
                  sampling_overrides: dict[str, Any], extract: Callable[[str, str], str | None],
                  seed: int) -> list[Sample]:
    """All ranks' samples of one benchmark (collective): problems are sharded over ranks."""
    info = dist.info()
    mine = shard_rows(list(enumerate(rows)), info.rank, info.world_size)
    out: list[Sample] = []
    chains = [(i, row, j, row.prompt) for i, row in mine for j in range(n)]
    sampling = rollout.sampling(n=1, **sampling_overrides)
    for rnd in range(1, rounds + 1):
        next_chains = []
        prompts = [PromptRow(p, row.answer, row.data_source) for _, row, _, p in chains]
        for start, gen, correct in generate_and_score(
                prompts, rollout=rollout, reward=reward, tokenizer=tokenizer, sampling=sampling,
                batch_size=batch_size, max_prompt_len=max_prompt_len, seed=seed + 1000 * rnd,
                progress=f"eval {name} round {rnd}"):
            chunk = chains[start:start + batch_size]
            for (i, row, j, _), text, ok in zip(chunk, gen.response_text, correct.tolist()):
                answer = extract(reward.scorer_for(row.data_source), text)
                out.append(Sample(name, row.uid or str(i), j, rnd, text, answer, bool(ok)))
                retry = render_prompt(row.problem + REANSWER.format(answer=answer or ""), fmt, tokenizer)
                next_chains.append((i, row, j, retry))
        chains = next_chains
    return [s for part in dist.all_gather_objects(out) for s in part]


def prompt_batch(rows: Sequence[PromptRow], tokenizer: Any, max_prompt_len: int) -> Batch:
    """Rows as a prompt batch; a prompt over max_prompt_len is an error (evaluation never drops)."""
    ds = PromptDataset(rows, tokenizer, max_prompt_len=max_prompt_len, drop_long=False)
    return collate_prompts([ds[i] for i in range(len(ds))], pad_id=tokenizer.pad_token_id)


def sampling_overrides(temperature: float | None, top_p: float | None, max_new_tokens: int | None
                       ) -> dict[str, Any]:
    """Only the evaluation settings that are set; the rest come from the rollout config."""
    out = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    return {k: v for k, v in out.items() if v is not None}

