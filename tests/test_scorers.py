"""Tests for roles/reward/scorers.py: registry, boxed extraction, addition and math scorers.

The dataset test reads JSONL files from $ROLEGRAPH_DATA_DIR (default: data/ at the repo root)
and skips when they are absent.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from roles.reward import scorers
from roles.reward.scorers import get_scorer, last_boxed, register_scorer, scorer_names

logger = logging.getLogger(__name__)

math_score = get_scorer("math")
addition_score = get_scorer("addition")


def boxed(answer: str) -> str:
    return "The answer is \\boxed{" + answer + "}"


# --------------------------------------------------------------------------- registry


def test_builtin_scorers_registered():
    assert {"addition", "math"} <= set(scorer_names())


def test_unknown_scorer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown scorer 'nope'.*addition.*math"):
        get_scorer("nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("math")(lambda response, ground_truth: 0.0)
    assert get_scorer("math") is math_score  # the original survives


# --------------------------------------------------------------------------- last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2} finally \\boxed{{3}}", "{3}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("answer $\\boxed 5$", "5"),
        ("\\boxed {12}", "12"),
        ("\\fbox{3}", "3"),
        ("\\boxed{1} and \\fbox{2}", "2"),
        ("\\boxed{\\frac{1}{2", None),
        ("\\boxed{7} then cut off \\boxed{\\sqrt{", None),
        ("no box here, 42", None),
        ("", None),
        ("\\boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# --------------------------------------------------------------------------- addition


@pytest.mark.parametrize(
    "response, truth, score",
    [
        ("0723", "0723", 1.0),
        ("0723 ", "0723", 1.0),
        ("\n0723\n", "0723", 1.0),
        ("1998", 1998, 1.0),
        ("723", "0723", 0.0),     # the width is part of the answer
        ("00723", "0723", 0.0),
        ("072", "0723", 0.0),
        ("0723x", "0723", 0.0),
        ("07 23", "0723", 0.0),
        ("+0723", "0723", 0.0),
        ("", "0723", 0.0),
        ("\u0660\u0667\u0662\u0663", "0723", 0.0),  # Arabic-Indic digits
    ],
)
def test_addition(response, truth, score):
    assert addition_score(response, truth) == score


# --------------------------------------------------------------------------- math

MATRIX = "\\begin{pmatrix} \\frac{18}{5} \\\\ -\\frac{9}{5} \\end{pmatrix}"

EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("3", "x=3"),
    ("x=3", "3"),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("[1,2)", "[1,2)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("(1,2)", "(1,2)"),
    ("(0,-5)", "(0, -5)"),
    ("14 \\text{ right triangles}", "14"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("10,\\!080", "10080"),
    ("\\frac{1}{29,\\!322}", "\\frac{1}{29322}"),
    ("2516_8", "2516_{8}"),
    ("a + b + c", "c+b+a"),
    ("e^{-x^2}", "e^{-x^{2}}"),  # a symbolic power in an exponent is no power tower
    (MATRIX, "\\begin{pmatrix}3.6\\\\-1.8\\end{pmatrix}"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("(1,2)", "(2,1)"),
    ("[1,2)", "[1,2]"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("1000", "100"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("\\text{Evelyn}", "\\text{Bob}"),
    ("2516_8", "2516_9"),  # math_verify alone drops the base subscript
    ("81, 256", "81, 255"),
    ("x_1", "x_2"),
    (MATRIX, MATRIX.replace("18", "28")),  # a row break "\\\\ " is not the spacing macro "\\ "
]


@pytest.mark.parametrize("truth, answer", EQUIVALENT)
def test_math_equivalent(truth, answer):
    assert math_score(boxed(answer), truth) == 1.0


@pytest.mark.parametrize("truth, answer", NOT_EQUIVALENT)
def test_math_not_equivalent(truth, answer):
    assert math_score(boxed(answer), truth) == 0.0


def test_math_last_box_wins():
    assert math_score("first \\boxed{4}, no wait: \\boxed{3}", "3") == 1.0
    assert math_score("first \\boxed{3}, no wait: \\boxed{4}", "3") == 0.0


def test_math_no_box_scores_zero():
    assert math_score("The answer is 3", "3") == 0.0
    assert math_score("", "3") == 0.0


def test_addition_rejects_bad_ground_truth():
    with pytest.raises(ValueError):
        addition_score("1", "one")
    with pytest.raises(ValueError):
        addition_score("1", "-1")


def test_math_int_ground_truth():
    assert math_score(boxed("27"), 27) == 1.0


def test_math_off_main_thread():
    """math_verify's signal timeouts only work on the main thread; elsewhere they are off."""
    cases = [(boxed("\\frac12"), "0.5", 1.0), (boxed("2"), "3", 0.0)]
    cases += [(boxed("9^{9^{9^{9^{9}}}}"), "1", 0.0)]
    results: list[float] = []

    def work() -> None:
        results.extend(math_score(response, truth) for response, truth, _ in cases)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert results == [score for _, _, score in cases]


HOSTILE = {
    "huge_number": "\\boxed{" + "9" * 100_000 + "}",
    "unbalanced": "\\boxed{\\frac{1}{2",
    "tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge_power": "\\boxed{9^{99999999999}}",
    "huge_factorial": "\\boxed{99999999999!}",
    "long_sum": "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(2000)) + "}",
    "deep_parens": "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "long_response": "blah " * 200_000 + "\\boxed{2}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_math_hostile_is_fast_and_wrong(name):
    start = time.perf_counter()
    assert math_score(HOSTILE[name], "1") == 0.0
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------- real data

DATA_DIR = Path(os.environ.get("ROLEGRAPH_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))
DATA_FILES = ["aime24.jsonl", "aime25.jsonl", "amc23.jsonl", "math500.jsonl", "gsm8k_test.jsonl"]
SENTINEL = "-987654321"  # no benchmark answer is this
_NUMBER_RE = re.compile(r"-?(?:\d+|\d*\.\d+)")


def wrong_answers(answer: str) -> list[str]:
    """Answers surely not equivalent to ``answer``: a sentinel, plus answer + 1 for numbers or
    the answer with its first digit changed (the first digit is never inside a unit such as
    "cm}^2", whose exponent scorers rightly ignore)."""
    wrong = [SENTINEL]
    if _NUMBER_RE.fullmatch(answer):
        wrong.append(str(Decimal(answer) + 1))
    elif digit := re.search(r"\d", answer):
        bumped = str((int(digit.group()) + 1) % 10)
        wrong.append(answer[: digit.start()] + bumped + answer[digit.end():])
    return wrong


def _rows(name: str) -> list[dict]:
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} missing; set ROLEGRAPH_DATA_DIR to a folder holding the benchmarks")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", DATA_FILES)
def test_dataset_answers(name):
    """Every gold answer scores 1 against itself, and its wrong variants score 0."""
    rows = _rows(name)
    failures = []
    start = time.perf_counter()
    for i, row in enumerate(rows):
        answer, row_id = row["answer"], row.get("id", i)
        if math_score(boxed(answer), answer) != 1.0:
            failures.append((row_id, answer, "self"))
        # The scorer short-cuts identical text; check math_verify itself reads every answer too.
        normalized = scorers._normalize(answer)
        if not scorers._verified_equal(normalized, normalized):
            failures.append((row_id, answer, "math_verify self"))
        for wrong in wrong_answers(answer):
            if math_score(boxed(wrong), answer) != 0.0:
                failures.append((row_id, answer, wrong))
    elapsed = time.perf_counter() - start
    logger.info("%s: %d rows scored in %.2fs", name, len(rows), elapsed)
    assert not failures, f"{len(failures)} of {len(rows)} rows failed: {failures}"
    assert elapsed < 60, f"{name} took {elapsed:.1f}s"


def test_math_answer_tag_scorer():
    tag = get_scorer("math_answer_tag")
    assert tag("<think>x = 1/2</think> <answer>\\frac{1}{2}</answer>", "0.5") == 1.0
    assert tag("<answer>\\boxed{4}</answer>", "4") == 1.0
    assert tag("<answer>1</answer> then <answer>3</answer>", "1") == 0.0  # the last tag counts
    assert tag("no tag \\boxed{4}", "4") == 0.0
