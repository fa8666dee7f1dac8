"""Benchmark evaluation: n samples per problem, scored like training, summarised as pass@k,
avg@k and maj@k, optionally over several rounds of "multi-round thinking".

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

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm import tqdm

from core import dist
from core.data import PromptDataset, PromptFormat, PromptRow, collate_prompts, render_prompt, shard_rows

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


def run_benchmark(name: str, rows: Sequence[PromptRow], *, rollout: Any, reward: Any, tokenizer,
                  fmt: PromptFormat, n: int, rounds: int, batch_size: int, max_prompt_len: int,
                  sampling_overrides: dict[str, Any], extract: Callable[[str, str], str | None],
                  seed: int) -> list[Sample]:
    """All ranks' samples of one benchmark (collective): problems are sharded over ranks."""
    info = dist.info()
    mine = shard_rows(list(enumerate(rows)), info.rank, info.world_size)
    out: list[Sample] = []
    chains = [(i, row, j, row.prompt) for i, row in mine for j in range(n)]
    show = tqdm(total=len(chains) * rounds, desc=f"eval {name}", disable=not info.is_main, leave=False)
    for rnd in range(1, rounds + 1):
        next_chains = []
        for start in range(0, len(chains), batch_size):
            chunk = chains[start:start + batch_size]
            batch = _prompt_batch([PromptRow(p, row.answer, row.data_source) for _, row, _, p in chunk],
                                  tokenizer, max_prompt_len).to(info.device)
            gen = rollout.generate(batch, rollout.sampling(n=1, seed=seed + 1000 * rnd + start,
                                                           **sampling_overrides))
            correct = reward.score(gen).value > 0.5
            for (i, row, j, _), text, ok in zip(chunk, gen.response_text, correct.tolist()):
                answer = extract(reward.scorer_for(row.data_source), text)
                out.append(Sample(name, row.uid or str(i), j, rnd, text, answer, bool(ok)))
                retry = render_prompt(row.problem + REANSWER.format(answer=answer or ""), fmt, tokenizer)
                next_chains.append((i, row, j, retry))
            show.update(len(chunk))
        chains = next_chains
    show.close()
    return [s for part in dist.all_gather_objects(out) for s in part]


def _prompt_batch(rows: list[PromptRow], tokenizer, max_prompt_len: int):
    ds = PromptDataset(rows, tokenizer, max_prompt_len=max_prompt_len)
    if len(ds) != len(rows):
        raise ValueError(f"{len(rows) - len(ds)} evaluation prompts exceed data.max_prompt_len="
                         f"{max_prompt_len}; raise it (evaluation never drops problems)")
    return collate_prompts([ds[i] for i in range(len(ds))], pad_id=tokenizer.pad_token_id)


def sampling_overrides(temperature: float | None, top_p: float | None, max_new_tokens: int | None
                       ) -> dict[str, Any]:
    """Only the evaluation settings that are set; the rest come from the rollout config."""
    out = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    return {k: v for k, v in out.items() if v is not None}

