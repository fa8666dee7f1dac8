"""Prompt data: rows (a built-in task or JSONL files) -> tokenized prompts -> a resumable,
rank-sharded stream of batches.

Every rank reads its own shard through a torchdata `StatefulDataLoader`. The sampler draws one
permutation per epoch from its own generator seeded with (seed, epoch), so the order is the same
on every rank and after a restore, and each rank takes every world_size-th index of it.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from core.batch import Batch

logger = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt_ids", "prompt_mask", "group_ids", "ground_truth", "data_source", "prompt_text")
"""The fields of a batch as the data loader yields it."""


@dataclass(frozen=True, slots=True)
class PromptRow:
    prompt: str
    """The full prompt text (chat template and instruction applied)."""
    answer: Any
    data_source: str
    problem: str = ""
    """The raw problem, for prompts built anew (multi-round thinking)."""
    uid: str = ""
    """The row's id field, or its line number."""


class PromptDataset(Dataset):
    """Rows with their prompt token ids; prompts longer than max_prompt_len are dropped (and
    counted, since a silent filter hides data problems), or with drop_long=False an error."""

    def __init__(self, rows: Sequence[PromptRow], tokenizer, *, max_prompt_len: int,
                 drop_long: bool = True) -> None:
        self.rows: list[PromptRow] = []
        self.ids: list[list[int]] = []
        encoded = tokenizer([r.prompt for r in rows], add_special_tokens=False)["input_ids"] if rows else []
        for row, ids in zip(rows, encoded):
            if len(ids) <= max_prompt_len:
                self.rows.append(row)
                self.ids.append(ids)
            elif not drop_long:
                raise ValueError(f"a prompt of {len(ids)} tokens exceeds data.max_prompt_len={max_prompt_len} "
                                 f"(evaluation never drops problems; raise it): {row.prompt[:80]!r}")
        self.dropped = len(rows) - len(self.rows)
        if self.dropped:
            logger.warning("dropped %d of %d prompts longer than %d tokens",
                           self.dropped, len(rows), max_prompt_len)
        if not self.rows:
            raise ValueError("no prompts left after the prompt-length filter")
        self.origin = list(range(len(self.rows)))
        """Index of each row in the full dataset (the group id; stable across subsets)."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, list[int], PromptRow]:
        return self.origin[i], self.ids[i], self.rows[i]

    def subset(self, indices: Sequence[int]) -> PromptDataset:
        """The rows at `indices` (positions in this dataset), keeping their original ids."""
        if not indices:
            raise ValueError("a prompt subset must not be empty")
        sub = object.__new__(PromptDataset)
        sub.rows = [self.rows[i] for i in indices]
        sub.ids = [self.ids[i] for i in indices]
        sub.origin = [self.origin[i] for i in indices]
        sub.dropped = 0
        return sub


def collate_prompts(items: Sequence[tuple[int, list[int], PromptRow]], *, pad_id: int) -> Batch:
    """Left-pad prompts into a Batch with the PROMPT_FIELDS."""
    width = max(len(ids) for _, ids, _ in items)
    ids_BP = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(items), width), dtype=torch.long)
    for b, (_, ids, _) in enumerate(items):
        if ids:
            ids_BP[b, width - len(ids):] = torch.tensor(ids)
            mask_BP[b, width - len(ids):] = 1
    return Batch(prompt_ids=ids_BP, prompt_mask=mask_BP,
                 group_ids=torch.tensor([i for i, _, _ in items], dtype=torch.long),
                 ground_truth=[r.answer for _, _, r in items],
                 data_source=[r.data_source for _, _, r in items],
                 prompt_text=[r.prompt for _, _, r in items])


class ShardedSampler(Sampler[int]):
    """This rank's indices of a seeded per-epoch permutation; stateful for exact resume."""

    def __init__(self, n: int, *, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        if n < world_size:
            raise ValueError(f"{n} prompts cannot be shared by {world_size} ranks")
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self._start = 0  # indices of this epoch already handed out (restored on resume)
        self._yielded = 0

    def __len__(self) -> int:
        return self.n // self.world

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[self.rank: len(self) * self.world: self.world]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        self._yielded = self._start
        self._start = 0
        for i in indices[self._yielded:]:
            self._yielded += 1
            yield i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._start = state["yielded"]


class PromptStream:
    """An endless iterator of this rank's prompt batches, epoch after epoch."""

    def __init__(self, dataset: PromptDataset, *, batch_size: int, rank: int, world_size: int,
                 seed: int, pad_id: int, shuffle: bool = True) -> None:
        if len(dataset) // world_size < batch_size:
            raise ValueError(f"each rank needs {batch_size} prompts per step but gets only "
                             f"{len(dataset) // world_size} per epoch")
        self.sampler = ShardedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed,
                                      shuffle=shuffle)
        # Its own generator: each `iter(loader)` draws a base seed, which must not come from the
        # global RNG (a resumed run would otherwise leave it a draw ahead of an uninterrupted one).
        with warnings.catch_warnings():
            # torchdata's constructor calls torch.set_vital, deprecated since torch 2.13; nothing
            # on our side can avoid it (torchdata 0.11 is the newest release)
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            self.loader = StatefulDataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                             drop_last=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(seed),
                                             collate_fn=lambda items: collate_prompts(items, pad_id=pad_id))
        self._it: Iterator[Batch] | None = None

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._it = iter(self.loader)
            return next(self._it)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.loader.load_state_dict(state["loader"])
        self._it = None

    def position(self) -> tuple[int, int]:
        """(epoch, samples this rank consumed in it): the world-size independent part of the state."""
        return self.sampler.epoch, self.sampler.state_dict()["yielded"]

    def seek(self, epoch: int, samples_consumed_per_rank: int) -> None:
        """Continue at `epoch` after skipping that many of this rank's samples (used when a
        checkpoint of another world size is resumed; a same-size resume uses load_state_dict)."""
        self.sampler.load_state_dict({"epoch": epoch, "yielded": samples_consumed_per_rank})
        self._it = None


def shard_rows(rows: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Every world_size-th row starting at rank (for evaluation; may differ by one per rank)."""
    return list(rows[rank::world_size])


@dataclass(kw_only=True, slots=True)
class PromptFormat:
    """How rows of a prompt file become prompts."""
    prompt_key: str = "problem"
    answer_key: str = "answer"
    data_source: str = "math"
    """Scorer for these rows (see roles/reward/scorers.py), unless a row has a `data_source` field."""
    chat_template: bool = True
    """Wrap the prompt as a user turn with the tokenizer's chat template."""
    system_prompt: str | None = None
    instruction: str = " Let's think step by step and output the final answer within \\boxed{}."
    """Appended to every problem."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed row (bad JSON or UTF-8, a missing, null or empty field, a wrong type, an unknown
    data_source): error (report up to five with file and line; nothing loads), or skip it and
    log how many were skipped, with the first five."""


def read_prompts(path: str | Path, fmt: PromptFormat, tokenizer: Any = None, *,
                 known_source: Callable[[str], bool] | None = None,
                 tools: list[dict[str, Any]] | None = None) -> list[PromptRow]:
    """Rows of a JSONL (one object per line) or Parquet prompt file. The problem must be a
    non-empty string, the answer present and not null or empty, the data_source (the row's, else
    data.format.data_source) one `known_source` accepts (a scorer exists for it). Malformed rows
    follow data.format.bad_rows (see read_rows). `tools`: the JSON schemas the chat template
    shows the model (multi-turn rollouts with tools)."""
    def parse(obj: dict, lineno: int) -> PromptRow:
        _require(obj, fmt.prompt_key, fmt.answer_key)
        problem, answer = obj[fmt.prompt_key], obj[fmt.answer_key]
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"field {fmt.prompt_key!r} must be a non-empty string, got "
                             f"{type(problem).__name__} {_short(problem)}")
        if answer is None or (isinstance(answer, (str, list, dict)) and not (answer.strip() if isinstance(
                answer, str) else answer)):
            raise ValueError(f"field {fmt.answer_key!r} must be a non-empty value, got {_short(answer)}")
        source = obj.get("data_source") or fmt.data_source
        if not isinstance(source, str) or (known_source is not None and not known_source(source)):
            raise ValueError(f"data_source {source!r} has no scorer (set reward.source_scorers or "
                             f"reward.scorer, or fix the row)")
        return PromptRow(render_prompt(problem, fmt, tokenizer, tools=tools), answer, source, problem,
                         str(obj.get("id", lineno)))
    return read_rows(path, parse, what="prompt", bad_rows=fmt.bad_rows)


def read_sft_pairs(path: str | Path, fmt: PromptFormat, response_key: str,
                   tokenizer=None) -> list[tuple[str, str]]:
    """(prompt, response) text pairs of a JSONL or Parquet file of supervised examples (e.g.
    long reasoning traces). The prompt is rendered exactly like an RL prompt (data.format: chat
    template, instruction), so SFT and RL see the same prompts; the response is the target."""
    def parse(obj: dict, lineno: int) -> tuple[str, str]:
        _require(obj, fmt.prompt_key, response_key)
        response = obj[response_key]
        if not isinstance(response, str) or not response:
            raise ValueError(f"field {response_key!r} must be a non-empty string")
        return render_prompt(str(obj[fmt.prompt_key]), fmt, tokenizer), response
    return read_rows(path, parse, what="SFT", bad_rows=fmt.bad_rows)


def _require(obj: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {missing} (has: {sorted(obj)})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_rows(path: str | Path, parse: Callable[[dict, int], Any], *, what: str,
              bad_rows: Literal["error", "skip"] = "error") -> list[Any]:
    """parse(row, line) over a JSONL or Parquet file; a malformed row (not UTF-8, bad JSON, not
    an object, or a ValueError from parse) is reported with file and line: five at a time, and
    nothing loads (bad_rows="error"), or skipped and counted in a warning ("skip")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    records: Iterator[tuple[int, Any]]
    if path.suffix == ".parquet":
        records = enumerate(pq.read_table(path).to_pylist(), 1)
        where = "row "
    else:
        records = _json_lines(path)
        where = ""
    rows, errors = [], []
    for lineno, obj in records:
        try:
            if isinstance(obj, Exception):
                raise obj
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            rows.append(parse(obj, lineno))
        except ValueError as e:
            errors.append(f"{path}:{where}{lineno}: {e}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        listed = "\n  ".join(errors[:5]) + more
        if bad_rows == "error":
            raise ValueError(f"malformed {what} rows (data.format.bad_rows=skip skips them):\n  {listed}")
        logger.warning("%s: skipped %d malformed %s rows of %d (data.format.bad_rows=skip):\n  %s",
                       path, len(errors), what, len(errors) + len(rows), listed)
    if not rows:
        raise ValueError(f"{what} file {str(path)!r} has no rows")
    return rows


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, ValueError(f"malformed JSON: {e}")



def render_prompt(problem: str, fmt: PromptFormat, tokenizer=None, *,
                  tools: list[dict[str, Any]] | None = None) -> str:
    text = problem + fmt.instruction
    if not fmt.chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.format.chat_template is set but the tokenizer has no chat template "
                         "(set data.format.chat_template=false for raw prompts)")
    messages = ([{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else [])
    messages.append({"role": "user", "content": text})
    if tools:  # the template lists them for the model (Qwen2.5 and Hermes-style templates do)
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
