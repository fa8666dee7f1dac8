"""Built-in verifiable tasks, generated from a seed, with a held-out split, and their
character-level tokenizer (built locally: nothing is downloaded).

`addition`: prompts "045+678=" (operands zero-padded to `digits`), answer "723", then EOS. The
scorer of the same name (roles/scorers.py) gives 1 for the exact sum, else 0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from core.data import PromptRow

SPECIALS = ("<pad>", "<eos>", "<unk>")
ALPHABET = "0123456789+-*=() "


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    name: str = "addition"
    """Built-in task: "addition"."""
    digits: int = 3
    """Operands have up to this many digits (zero-padded in the prompt)."""
    min_operand: int = 0
    eval_size: int = 200
    """Held-out problems, never drawn for training."""
    train_size: int = 20000
    seed: int = 1234
    """Seed of the problem generator (independent of run.seed)."""


@dataclass(frozen=True, slots=True)
class Task:
    train: list[PromptRow]
    eval: list[PromptRow]


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, plus <pad>=0, <eos>=1, <unk>=2."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name != "addition":
        raise ValueError(f"unknown built-in task {cfg.name!r}; valid: addition")
    hi = 10**cfg.digits - 1
    space = (hi - cfg.min_operand + 1) ** 2
    if cfg.eval_size + cfg.train_size > space:
        raise ValueError(f"task.train_size + task.eval_size exceed the {space} distinct problems")
    rng = random.Random(cfg.seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < cfg.eval_size + cfg.train_size:
        a, b = rng.randint(cfg.min_operand, hi), rng.randint(cfg.min_operand, hi)
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    rows = [PromptRow(f"{a:0{cfg.digits}d}+{b:0{cfg.digits}d}=", str(a + b), "addition")
            for a, b in pairs]
    return Task(train=rows[cfg.eval_size:], eval=rows[:cfg.eval_size])
