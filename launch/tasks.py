"""Built-in verifiable tasks, generated from a seed, with a held-out split, and their
character-level tokenizers (built locally: nothing is downloaded).

`data.task` is a typed slot: `data.task.name` picks the task's Config (its generator, teacher and
alphabet), registered by name with `register_task`.

`addition`: prompt "045+678=" (operands zero-padded to `digits`), answer "0723" (the sum,
zero-padded to digits + 1), then EOS. The scorer of the same name (roles/reward/scorers.py) gives 1 for
exactly that text, else 0.

The supervised warm-up learns from a *sloppy teacher* that forgets each carry with probability
`teacher_carry_drop`. Imitating it faithfully, a model answers greedily like the teacher's most
likely output: it drops carries and gets only carry-free sums right, and more supervised steps
do not change that. RL with a verifier rewards the true sum and has to find carrying itself:
the quickstart shows what reinforcement learning adds over imitation.

`long_addition`: prompt "4567+8912=" (two operands of n digits each, n drawn uniformly from
`min_digits` to `digits`), answer the plain sum "13479". A *worked solution* rewrites the problem
one column at a time, right to left, and ends with the answer after "=":

    4567+8912=
    456+891:09
    45+89:079
    4+8:1479
    =13479

After i columns a line reads "A+B:P": the operands without their i lowest digits and the sum of
those i columns with its carry in front, so a + b = (A + B) * 10**i + P. Each line is a small
local step from the one above (drop one digit of each operand, add that column to the carry,
put the digit in front of the partial sum), and the last step is taken in the answer itself.
Its length grows with the square of n: 3 or 4 characters for one digit, up to 123 for eight
(plus EOS). The scorer of the same name reads the text after the last "=" (the prompt's own
"=" when the response answers directly).

Its teacher is *lazy*: with probability `teacher_skip` it writes only the answer (forgetting
each carry with probability `teacher_carry_drop`, 0 by default: the lazy teacher is exact), else
the worked solution. Supervised imitation learns both modes and, greedily, the more frequent
one: it answers long problems without working them out and gets few right. RL with a verifier
rewards the right answer only; working it out is what pays, so the policy learns to think on
the problems that need it (configs/quickstart-long.yaml).

`multiplication`: prompt "123*456=" (two 3-digit operands), answer "56088". A model of the
quickstart's size cannot multiply in its head, but it can call the calculator: in the plain
tool format (roles/rollout/multiturn.py) it writes "[123*456]", generation stops at "]", the
rollout appends the observation "{56088}", and the model states the answer: the response is
"[123*456]{56088}56088". Its teacher calls the calculator with probability `teacher_call`
(0.2) and otherwise writes a product straight away; imitation learns both, and greedily the
more frequent one, which is nearly always wrong. RL rewards the right product only: calling
is what pays (configs/quickstart-tools.yaml).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from core.config import Slot, at_least, between
from core.data import PromptRow
from core.registry import Registry

SPECIALS = ("<pad>", "<eos>", "<unk>")
ALPHABET = "0123456789+-*=() "
LONG_ALPHABET = ALPHABET + ":\n"
"""The addition alphabet (same ids) plus the worked solution's ":" and line breaks."""
TOOL_ALPHABET = ALPHABET + "[]{}"
"""The addition alphabet plus a plain-format tool call's "[...]" and observation's "{...}"."""

TASKS: Registry[type[TaskConfig]] = Registry("built-in task")
"""Task name -> its Config class (which generates the rows and answers as the teacher)."""
register_task = TASKS.register


@dataclass(kw_only=True, slots=True)
class TaskConfig(Slot):
    """The `data.task` slot and the `addition` task's Config."""
    name: str = "addition"
    """Built-in task: "addition", "long_addition" or "multiplication"."""
    digits: int = 3
    """Operands have up to this many digits (zero-padded in the prompt)."""
    eval_size: int = 500
    """Held-out problems, never drawn for training."""
    train_size: int = 50000
    seed: int = 1234
    """Seed of the problem generator (independent of run.seed)."""
    teacher_carry_drop: float = 0.6
    """Supervised targets (launch.sft) forget each carry with this probability."""

    alphabet: ClassVar[str] = ALPHABET
    """The characters of the task's prompts and answers (its char tokenizer's vocabulary)."""

    @classmethod
    def variant(cls, name: str) -> type:
        return TASKS.get(name)

    def rows(self) -> tuple[list[PromptRow], list[PromptRow]]:
        """(train, held-out) rows, generated from `seed`."""
        n = 10**self.digits
        if self.eval_size + self.train_size > n * n:
            raise ValueError(f"task.train_size + task.eval_size exceed the {n * n} distinct problems")
        rng = random.Random(self.seed)
        # Distinct pairs without replacement; the held-out split comes first and is never trained on.
        pairs = [divmod(i, n) for i in rng.sample(range(n * n), self.eval_size + self.train_size)]
        w = self.digits
        rows = [PromptRow(f"{a:0{w}d}+{b:0{w}d}=", f"{a + b:0{w + 1}d}", "addition") for a, b in pairs]
        return rows[self.eval_size:], rows[:self.eval_size]

    def teacher_answer(self, prompt: str, rng: random.Random) -> str:
        """The sloppy teacher's answer to a prompt: each carry dropped with probability p."""
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        return sloppy_sum(a, b, digits=self.digits, drop=self.teacher_carry_drop, rng=rng)


register_task("addition")(TaskConfig)


@register_task("long_addition")
@dataclass(kw_only=True, slots=True)
class LongAdditionConfig(TaskConfig):
    """Sums of 1 to 8 digits, answered directly or with a worked solution (module docstring)."""
    name: str = "long_addition"
    digits: int = 8
    """Operands have at most this many digits (both operands of a problem have the same count)."""
    min_digits: int = 1
    """Operands have at least this many digits; each count in [min_digits, digits] is equally likely."""
    teacher_skip: float = 0.7
    """The teacher writes only the answer, without the worked lines, with this probability."""
    teacher_carry_drop: float = 0.0
    """The teacher's direct answers forget each carry with this probability (0: exact)."""

    alphabet: ClassVar[str] = LONG_ALPHABET

    def __post_init__(self) -> None:
        at_least(self, 1, "min_digits", "eval_size")
        at_least(self, self.min_digits, "digits")
        at_least(self, 0, "train_size")
        between(self, 0, 1, "teacher_skip", "teacher_carry_drop")

    def rows(self) -> tuple[list[PromptRow], list[PromptRow]]:
        """Held-out problems are distinct; training problems may repeat (there are only 100
        one-digit sums) but are never held-out ones."""
        rng = random.Random(self.seed)
        counts = range(self.min_digits, self.digits + 1)
        eval_digits = [rng.choice(counts) for _ in range(self.eval_size)]
        held: dict[int, list[int]] = {}
        for n in counts:
            want, have = eval_digits.count(n), _operands(n)[1] ** 2
            if want >= have:
                raise ValueError(f"task.eval_size={self.eval_size} draws {want} held-out {n}-digit problems, "
                                 f"but there are only {have} (and training needs some): lower it or raise min_digits")
            held[n] = rng.sample(range(have), want)
        taken = {n: set(ids) for n, ids in held.items()}
        order = {n: iter(ids) for n, ids in held.items()}
        eval_rows = [self._row(n, next(order[n])) for n in eval_digits]
        train_rows = []
        for _ in range(self.train_size):
            n = rng.choice(counts)
            i = rng.randrange(_operands(n)[1] ** 2)
            while i in taken[n]:
                i = rng.randrange(_operands(n)[1] ** 2)
            train_rows.append(self._row(n, i))
        return train_rows, eval_rows

    @staticmethod
    def _row(n: int, index: int) -> PromptRow:
        low, count = _operands(n)
        a, b = low + index // count, low + index % count
        return PromptRow(f"{a}+{b}=", str(a + b), "long_addition")

    def teacher_answer(self, prompt: str, rng: random.Random) -> str:
        """The lazy teacher: the answer alone with probability teacher_skip, else the worked solution."""
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        if rng.random() >= self.teacher_skip:
            return worked_sum(a, b)
        direct = sloppy_sum(a, b, digits=len(str(a)), drop=self.teacher_carry_drop, rng=rng)
        return direct.lstrip("0") or "0"  # the plain sum: no leading zeros


@register_task("multiplication")
@dataclass(kw_only=True, slots=True)
class MultiplicationConfig(TaskConfig):
    """Products of two `digits`-digit numbers, for the tools quickstart (module docstring)."""
    name: str = "multiplication"
    digits: int = 3
    """Both operands have exactly this many digits."""
    teacher_call: float = 0.2
    """The teacher calls the calculator ("[a*b]{product}product") with this probability, else
    it writes a product straight away."""

    alphabet: ClassVar[str] = TOOL_ALPHABET

    def __post_init__(self) -> None:
        at_least(self, 1, "digits", "eval_size")
        at_least(self, 0, "train_size")
        between(self, 0, 1, "teacher_call")

    def rows(self) -> tuple[list[PromptRow], list[PromptRow]]:
        low, count = _operands(self.digits)
        if self.eval_size + self.train_size > count * count:
            raise ValueError(f"task.train_size + task.eval_size exceed the {count * count} distinct problems")
        rng = random.Random(self.seed)
        pairs = [divmod(i, count) for i in rng.sample(range(count * count), self.eval_size + self.train_size)]
        rows = [PromptRow(f"{low + a}*{low + b}=", str((low + a) * (low + b)), "multiplication") for a, b in pairs]
        return rows[self.eval_size:], rows[:self.eval_size]

    def teacher_answer(self, prompt: str, rng: random.Random) -> str:
        """The call and the copied answer with probability teacher_call, else the product
        written directly (which a small model cannot compute: it learns only its shape)."""
        a, b = (int(x) for x in prompt.rstrip("=").split("*"))
        if rng.random() < self.teacher_call:
            return f"[{a}*{b}]{{{a * b}}}{a * b}"
        return str(a * b)


def _operands(n: int) -> tuple[int, int]:
    """(smallest, count) of the n-digit operands: 0..9 for one digit, else no leading zero."""
    low = 10 ** (n - 1) if n > 1 else 0
    return low, 10**n - low


def worked_sum(a: int, b: int) -> str:
    """The worked solution of a + b (operands of equal length): one line per column but the
    last, then "=" and the sum (module docstring). Starts with a line break."""
    sa, sb = str(a), str(b)
    if len(sa) != len(sb):
        raise ValueError(f"worked_sum needs operands of equal length, got {a} and {b}")
    lines, partial, carry = [""], "", 0
    for i in range(1, len(sa)):
        column = int(sa[-i]) + int(sb[-i]) + carry
        carry, partial = column // 10, str(column % 10) + partial
        lines.append(f"{sa[:-i]}+{sb[:-i]}:{carry}{partial}")
    return "\n".join(lines) + f"\n={a + b}"


@dataclass(frozen=True, slots=True)
class Task:
    cfg: TaskConfig
    train: list[PromptRow]
    eval: list[PromptRow]

    def teacher_answer(self, row: PromptRow, rng: random.Random) -> str:
        """The task's teacher's answer to a prompt (supervised targets of launch.sft)."""
        return self.cfg.teacher_answer(row.prompt, rng)


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


def task_tokenizer(cfg: TaskConfig) -> PreTrainedTokenizerFast:
    """The char tokenizer of a task's alphabet (shared characters keep the addition task's ids)."""
    return char_tokenizer(cfg.alphabet)


def build_task(cfg: TaskConfig) -> Task:
    """The task's rows; `cfg` is the Config its name registers (the config loader ensures it)."""
    schema = TASKS.get(cfg.name)
    if type(cfg) is not schema:
        raise TypeError(f"task {cfg.name!r} is configured by {schema.__name__}, got a {type(cfg).__name__}")
    train, held_out = cfg.rows()
    return Task(cfg=cfg, train=train, eval=held_out)
