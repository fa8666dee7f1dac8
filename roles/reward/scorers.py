"""Rule-based reward scorers, registered by name.

A scorer is a plain callable ``(response, ground_truth) -> float``: ``response`` is the decoded
text the policy generated after the prompt (no special tokens, possibly trailing whitespace),
``ground_truth`` is the dataset's reference answer. It returns the reward for that one sample,
1.0 for correct and 0.0 for wrong in the scorers here. The reward role picks a scorer by the
sample's ``data_source`` (or a configured name) through :func:`get_scorer`.

Built-in scorers:

* ``addition``: the built-in ``"045+678="`` task; 1.0 iff the stripped response is exactly the
  fixed-width answer (``"0723"``).
* ``long_addition``: the built-in ``"4567+8912="`` task; 1.0 iff the text after the last ``=``
  (the whole response if it has none) is exactly the sum (``"13479"``).
* ``math``: the last ``\\boxed{...}`` of the response compared with the ground truth by
  mathematical equivalence (``math_verify``). Never raises; any failure scores 0.0.
* ``none``: 0.0 for every response, for rewards from an environment alone
  (``rollout.tools.env``, ``reward.scorer=none``).

Register a new scorer with the decorator; names are unique::

    @register_scorer("exact")
    def exact(response: str, ground_truth: Any) -> float:
        return float(response.strip() == str(ground_truth))
"""
from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from core.registry import Registry

logger = logging.getLogger(__name__)

Scorer = Callable[[str, Any], float]

SCORERS: Registry[Scorer] = Registry("scorer")
register_scorer = SCORERS.register
"""Decorator registering a scorer under a name; a name already taken raises ValueError."""
get_scorer = SCORERS.get
"""The scorer registered under a name; an unknown name raises ValueError listing valid ones."""
scorer_names = SCORERS.names


@register_scorer("none")
def no_scorer(response: str, ground_truth: Any) -> float:
    """0: the sample's reward is its environment's alone."""
    return 0.0


# --------------------------------------------------------------------------- answer extraction

# The negative lookahead keeps \boxedfoo (another macro) from counting as a box.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_BOX_ARG_RE = re.compile(r"\s+([^\s$]+)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``.

    Nested braces are matched; escaped braces (``\\{``) do not count. Returns None when there is
    no box or the last one is unbalanced (e.g. a generation cut off inside the answer).
    """
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007  (the loop only finds the last match)
        pass
    if last is None:
        return None
    rest = text[last.end():]
    if rest.lstrip().startswith("{"):
        return _braced_group(rest.lstrip())
    bare = _BARE_BOX_ARG_RE.match(rest)  # "\boxed 5", the MATH dataset's brace-less form
    return bare.group(1) if bare else None


def _braced_group(text: str) -> str | None:
    """Content of the ``{...}`` group that opens ``text``, or None if it never closes."""
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped char: \{ \} \\ are not group delimiters
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[1:i]
        i += 1
    return None


# --------------------------------------------------------------------------- addition

_DIGITS_RE = re.compile(r"[0-9]+")


@register_scorer("addition")
def addition_scorer(response: str, ground_truth: Any) -> float:
    """1.0 iff ``response.strip()`` is exactly the ground-truth answer string, else 0.0.

    The built-in task writes answers at a fixed width (``"045+678="`` -> ``"0723"``), so the
    ground truth is the exact expected text. Anything else (a missing leading zero, extra
    characters, unicode digits) scores 0.0. A ground truth that is not ASCII digits raises
    ValueError: that is a data bug, not a wrong answer.
    """
    expected = str(ground_truth)
    if _DIGITS_RE.fullmatch(expected) is None:
        raise ValueError(f"addition ground truth must be ASCII digits, got {expected!r}")
    return float(response.strip() == expected)


# --------------------------------------------------------------------------- long addition

@register_scorer("long_addition")
def long_addition_scorer(response: str, ground_truth: Any) -> float:
    """1.0 iff the response's final answer is exactly the ground-truth sum, else 0.0.

    The built-in ``long_addition`` task (``"4567+8912="``) answers either right away
    (``"13479"``: the prompt's own ``=`` is the marker) or after a worked solution whose lines
    contain no ``=`` and which ends with ``"=13479"``. The final answer is therefore the text
    after the response's last ``=``, or the whole response if it has none, stripped; whatever
    comes before the marker is ignored. One reverse search: linear in the response length. A
    ground truth that is not ASCII digits raises ValueError: that is a data bug, not a wrong
    answer.
    """
    expected = str(ground_truth)
    if _DIGITS_RE.fullmatch(expected) is None:
        raise ValueError(f"long_addition ground truth must be ASCII digits, got {expected!r}")
    return float(_after_last_equals(response) == expected)


def _after_last_equals(response: str) -> str:
    return response[response.rfind("=") + 1:].strip()  # rfind is -1 without a marker: all of it


# --------------------------------------------------------------------------- multiplication (tools)

@register_scorer("multiplication")
def multiplication_scorer(response: str, ground_truth: Any) -> float:
    """1.0 iff the response's final answer is exactly the ground-truth product, else 0.0.

    The built-in ``multiplication`` task (``"123*456="``, configs/quickstart-tools.yaml) is
    answered right away (``"56088"``) or after a calculator call and its observation
    (``"[123*456]{56088}56088"``: the response text holds the whole transcript). The final
    answer is the text after the last ``}``, or the whole response without one, stripped: the
    observation itself is never the answer, the model has to state it. A ground truth that is
    not ASCII digits raises ValueError: that is a data bug, not a wrong answer.
    """
    expected = str(ground_truth)
    if _DIGITS_RE.fullmatch(expected) is None:
        raise ValueError(f"multiplication ground truth must be ASCII digits, got {expected!r}")
    return float(response[response.rfind("}") + 1:].strip() == expected)


# --------------------------------------------------------------------------- math

PARSE_TIMEOUT_S = 2
"""math_verify's per-parse limit (signal based, main thread only)."""
VERIFY_TIMEOUT_S = 2
"""math_verify's per-comparison limit (signal based, main thread only)."""
MAX_ANSWER_CHARS = 500
"""Longer boxed answers score 0: real answers are < 200 chars and sympy slows down sharply."""

# Without a timeout (non-main threads) sympy can spend hours on values like 9^{9^{9}}, 10^{10^9}
# or 99999999999!; these cheap textual checks refuse them up front on every thread, so the
# reward does not depend on which thread scored it.
_EXPLOSIVE_RES = (
    re.compile(r"\^\s*\{[^{}]*\d\s*\)?\s*\^"),  # numeric power in an exponent: a tower
    re.compile(r"\^\s*\{?\s*\(?\s*\d{6,}"),  # exponent with 6+ digits
    re.compile(r"\d{5,}\s*!"),  # factorial of a 5+ digit number
)
# The row break \\ is matched (and kept) first, so "\\ 2" never loses "\ " as a spacing macro.
_SPACING_RE = re.compile(r"\\\\|\\[,;:! ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])")
# TeX's thousands separators: 29,\!322 and 29{,}322 (math_verify reads the latter, not the former).
_THOUSANDS_RE = re.compile(r"(?<=\d)(?:,\\!|\{,\})(?=\d{3})")
# Whitespace is insignificant in math mode except between two letters ("\pi r", "\text{a b}").
_SPACE_RE = re.compile(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])")
_BASED_NUMBER_RE = re.compile(r"(-?[0-9A-Za-z]+)_\{?([0-9]+)\}?")
_LATEX_CFG = (LatexExtractionConfig(),)
_EXPR_CFG = (ExprExtractionConfig(),)


@register_scorer("math")
def math_scorer(response: str, ground_truth: Any) -> float:
    """1.0 iff the response's last boxed answer equals ``ground_truth`` mathematically, else 0.0.

    ``ground_truth`` is LaTeX or plain text (``"\\frac{1}{2}"``, ``"(0,-5)"``, ``"1000"``); a
    boxed ground truth is unwrapped. Never raises.
    """
    try:
        return float(_math_equal(response, ground_truth))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        logger.debug("math scorer failed; scoring 0", exc_info=True)
        return 0.0


def last_answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>``: between the last closing tag and the
    nearest opening tag before it; None without a complete pair. Two reverse searches, so linear
    in the length (a regex over many unclosed openings is quadratic)."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>"):end] if start >= 0 else None


@register_scorer("math_answer_tag")
def math_answer_tag_scorer(response: str, ground_truth: Any) -> float:
    """As ``math``, but the final answer is the content of the last ``<answer>...</answer>``
    (a ``\boxed{}`` inside it is unwrapped), the R1-Zero template's answer tag."""
    tag = last_answer_tag(response)
    if tag is None:
        return 0.0
    inner = tag.strip()
    return math_scorer(inner if last_boxed(inner) is not None else f"\\boxed{{{inner}}}", ground_truth)


def _math_equal(response: str, ground_truth: Any) -> bool:
    pred = last_boxed(response)
    if pred is None:
        return False
    gold_text = str(ground_truth)
    gold = _normalize(last_boxed(gold_text) or gold_text)
    pred = _normalize(pred)
    if not pred or not gold:
        return False
    if _squash(pred) == _squash(gold):  # identical text is equal whatever sympy makes of it
        return True
    if len(pred) > MAX_ANSWER_CHARS or any(r.search(pred) for r in _EXPLOSIVE_RES):
        logger.debug("refusing to parse a hostile answer of %d chars", len(pred))
        return False
    based = _based_numbers_equal(gold, pred)
    if based is not None:
        return based
    return _verified_equal(gold, pred)


def _based_numbers_equal(gold: str, pred: str) -> bool | None:
    """Verdict when both answers are numbers with a base subscript (``52_8``), else None.

    math_verify drops subscripts, so it would read 52_8 and 52_9 both as 52.
    """
    gold_match = _BASED_NUMBER_RE.fullmatch(gold)
    pred_match = _BASED_NUMBER_RE.fullmatch(pred)
    if gold_match is None or pred_match is None:
        return None
    same_digits = gold_match.group(1) == pred_match.group(1)
    return same_digits and int(gold_match.group(2)) == int(pred_match.group(2))


def _verified_equal(gold: str, pred: str) -> bool:
    """math_verify's verdict on two normalized bare answers (no string shortcut)."""
    parse_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse_gold(gold, parse_timeout)
    pred_parsed = _parse(pred, parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return verify(gold_parsed, pred_parsed, timeout_seconds=verify_timeout)


def _normalize(answer: str) -> str:
    """Drop LaTeX that never changes the value: spacing macros, \\left/\\right, $, extra blanks."""
    answer = _THOUSANDS_RE.sub("", answer.strip().strip("$"))
    answer = _SPACING_RE.sub(_drop_spacing, answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return " ".join(answer.split()).rstrip(".")


def _squash(answer: str) -> str:
    """``answer`` without the blanks that LaTeX math mode ignores."""
    return _SPACE_RE.sub("", answer)


def _drop_spacing(match: re.Match[str]) -> str:
    return match.group() if match.group() == "\\\\" else ""


def _timeouts() -> tuple[int | None, int | None]:
    """(parse, verify) timeouts; None off the main thread, where signal.alarm is unavailable."""
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def _parse(answer: str, timeout_s: int | None) -> list[Any]:
    """math_verify's parse of one bare answer: the first strategy that yields a sympy value.

    Boxed LaTeX extraction handles nearly every answer, text and units included; the blank-free
    form rescues a few that math_verify's unit stripping mangles ("a + b + c"), and plain
    expression extraction a few it cannot read as LaTeX. If none yields a value, the first
    string fallback is returned so that verify can still compare normalized strings.
    """
    candidates = [(f"\\boxed{{{answer}}}", _LATEX_CFG)]
    if (squashed := _squash(answer)) != answer:
        candidates.append((f"\\boxed{{{squashed}}}", _LATEX_CFG))
    candidates.append((answer, _EXPR_CFG))
    fallback: list[Any] = []
    deadline = time.monotonic() + timeout_s if timeout_s else None
    for text, cfg in candidates:
        parsed = parse(text, extraction_config=cfg, parsing_timeout=timeout_s)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
        fallback = fallback or parsed
        if deadline is not None and time.monotonic() >= deadline:
            break  # this strategy hit the timeout; the others would spend it again
    return fallback


# A GRPO group scores many responses against one ground truth: parse it once.
_parse_gold = functools.lru_cache(maxsize=4096)(_parse)


# --------------------------------------------------------------------------- answer extraction for voting

def _math_answer(response: str) -> str | None:
    boxed = last_boxed(response)
    return _squash(_normalize(boxed)) if boxed else None


def _tag_answer(response: str) -> str | None:
    tag = last_answer_tag(response)
    return _squash(_normalize(last_boxed(tag) or tag)) if tag is not None else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "addition": lambda response: response.strip() or None,
    "long_addition": lambda response: _after_last_equals(response) or None,
    "math": _math_answer,
    "math_answer_tag": _tag_answer,
}
"""Per scorer: the final answer of a response as a canonical string (for majority voting)."""


def extract_answer(scorer: str, response: str) -> str | None:
    """The response's final answer for `scorer` (None if it has none, or the scorer has no
    extractor): normalised text, so identical answers written alike vote together."""
    fn = EXTRACTORS.get(scorer)
    try:
        return fn(response) if fn else None
    except Exception:  # an odd response must not stop an evaluation
        return None
