"""Built-in verifiable tasks, generated from a seed, with a held-out split, and their
character-level tokenizer (built locally: nothing is downloaded).

`addition`: prompt "045+678=" (operands zero-padded to `digits`), answer "0723" (the sum,
zero-padded to digits + 1), then EOS. The scorer of the same name (roles/reward/scorers.py) gives 1 for
exactly that text, else 0.

The supervised warm-up learns from a *sloppy teacher* that forgets each carry with probability
`teacher_carry_drop`. Imitating it faithfully, a model answers greedily like the teacher's most
likely output: it drops carries and gets only carry-free sums right, and more supervised steps
do not change that. RL with a verifier rewards the true sum and has to find carrying itself:
the quickstart shows what reinforcement learning adds over imitation.
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
    eval_size: int = 500
    """Held-out problems, never drawn for training."""
    train_size: int = 50000
    seed: int = 1234
    """Seed of the problem generator (independent of run.seed)."""
    teacher_carry_drop: float = 0.6
    """Supervised targets (launch.sft) forget each carry with this probability."""


@dataclass(frozen=True, slots=True)
class Task:
    cfg: TaskConfig
    train: list[PromptRow]
    eval: list[PromptRow]

    def teacher_answer(self, row: PromptRow, rng: random.Random) -> str:
        """The sloppy teacher's answer to a prompt: each carry dropped with probability p."""
        a, b = (int(x) for x in row.prompt.rstrip("=").split("+"))
        return sloppy_sum(a, b, digits=self.cfg.digits, drop=self.cfg.teacher_carry_drop, rng=rng)


def sloppy_sum(a: int, b: int, *, digits: int, drop: float, rng: random.Random) -> str:
    """a + b written at digits + 1 characters, forgetting each carry with probability `drop`."""
    out, carry = [], 0
    for _ in range(digits):
        d = a % 10 + b % 10 + carry
        a, b = a // 10, b // 10
        out.append(d % 10)
        carry = int(d >= 10 and rng.random() >= drop)
    out.append(carry)
    return "".join(str(x) for x in reversed(out))


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, plus <pad>=0, <eos>=1, <unk>=2."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # [\s\S], not ".": a run of newlines must split into single characters too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name != "addition":
        raise ValueError(f"unknown built-in task {cfg.name!r}; valid: addition")
    n = 10**cfg.digits
    if cfg.eval_size + cfg.train_size > n * n:
        raise ValueError(f"task.train_size + task.eval_size exceed the {n * n} distinct problems")
    rng = random.Random(cfg.seed)
    # Distinct pairs without replacement; the held-out split comes first and is never trained on.
    pairs = [divmod(i, n) for i in rng.sample(range(n * n), cfg.eval_size + cfg.train_size)]
    w = cfg.digits
    rows = [PromptRow(f"{a:0{w}d}+{b:0{w}d}=", f"{a + b:0{w + 1}d}", "addition") for a, b in pairs]
    return Task(cfg=cfg, train=rows[cfg.eval_size:], eval=rows[:cfg.eval_size])
