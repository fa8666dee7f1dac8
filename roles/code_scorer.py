"""The `code` scorer: run the response's program in the sandbox against tests.

The program is the last ```python fenced block of the response (else the last fenced block,
else the whole response). The ground truth is a dict, or its JSON: `{"tests": [{"input": ...,
"output": ...}], "fraction": false}` (stdin/stdout tests; outputs compared after stripping
trailing whitespace per line) or `{"assert": "assert f(1) == 2"}` (appended to the program).
Reward 1.0 iff every test passes (or the fraction passing with "fraction": true); anything the
program does scores 0.0. See :func:`score_code`.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from roles.sandbox import RunResult, SandboxConfig, run_python
from roles.scorers import register_scorer


_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = frozenset({"python", "python3", "py"})
_TEST_KEYS = frozenset({"tests", "assert", "fraction"})

CODE_SCORER_CONFIG = SandboxConfig()
"""Sandbox limits for the registered ``code`` scorer (one run per test case)."""


@dataclass(frozen=True, slots=True)
class CodeTests:
    """A parsed ``code`` ground truth: stdin/stdout cases, or asserts appended to the program."""

    cases: tuple[tuple[str, str], ...] = ()
    """(stdin, expected stdout) pairs."""
    asserts: str | None = None
    """Python source appended to the program; passing means it runs to its end and exits 0."""
    fraction: bool = False
    """Score the fraction of passing cases instead of all-or-nothing."""


def extract_program(response: str) -> str:
    """The last ```python fenced block, else the last fenced block, else the whole response."""
    blocks = _FENCE_RE.findall(response)
    tagged = [body for tag, body in blocks if tag.strip().lower() in _PYTHON_TAGS]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else response


def parse_code_tests(ground_truth: Any) -> CodeTests:
    """A ``code`` ground truth (dict or JSON text) as CodeTests; ValueError if malformed.

    ``{"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...], "fraction": false}`` or
    ``{"assert": "assert f(1) == 2\\n..."}``.
    """
    gt = json.loads(ground_truth) if isinstance(ground_truth, (str, bytes)) else ground_truth
    if not isinstance(gt, dict):
        raise ValueError(f"code ground truth must be a dict or JSON object, "
                         f"got {type(gt).__name__}")
    if unknown := set(gt) - _TEST_KEYS:
        raise ValueError(f"code ground truth: unknown keys {sorted(unknown)}; "
                         f"valid: {sorted(_TEST_KEYS)}")
    if ("tests" in gt) == ("assert" in gt):
        raise ValueError("code ground truth needs exactly one of 'tests' and 'assert'")
    fraction = gt.get("fraction", False)
    if not isinstance(fraction, bool):
        raise ValueError(f"code ground truth: 'fraction' must be a bool, got {fraction!r}")
    if "assert" in gt:
        if not isinstance(gt["assert"], str) or not gt["assert"].strip():
            raise ValueError("code ground truth: 'assert' must be non-empty Python source")
        return CodeTests(asserts=gt["assert"], fraction=fraction)
    tests = gt["tests"]
    if not isinstance(tests, list) or not tests:
        raise ValueError("code ground truth: 'tests' must be a non-empty list")
    cases = []
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and set(case) == {"input", "output"}
                and all(isinstance(v, str) for v in case.values())):
            raise ValueError(
                f"code ground truth: tests[{i}] must be {{'input': str, 'output': str}}")
        cases.append((case["input"], case["output"]))
    return CodeTests(cases=tuple(cases), fraction=fraction)


def score_code(response: str, ground_truth: Any, *,
               cfg: SandboxConfig = CODE_SCORER_CONFIG) -> float:
    """Reward in [0, 1] for the program in ``response`` against a ``code`` ground truth.

    1.0 iff every test passes (the program exits 0 within the limits and, for stdin/stdout
    cases, prints the expected output up to trailing whitespace on each line and trailing blank
    lines; for asserts, reaches the end of them: a random token printed after the asserts must
    be the last line, so exiting early with status 0 does not pass); with ``fraction`` the
    fraction of passing cases. Anything the response does scores
    0.0, never raises. A malformed ground truth raises ValueError (a data bug), and a sandbox
    that cannot start raises RuntimeError: both are machine or data problems, which the reward
    role counts in ``reward/errors`` rather than hiding them as zero rewards.
    """
    tests = parse_code_tests(ground_truth)
    program = extract_program(response)
    if tests.asserts is not None:
        token = secrets.token_hex(16)
        result = run_python(f"{program}\n\n{tests.asserts}\nprint({token!r})\n", cfg=cfg)
        last_line = result.stdout.rstrip().splitlines()[-1:]
        return float(result.returncode == 0 and last_line == [token])
    passed = 0
    for stdin, expected in tests.cases:
        ok = _passed(run_python(program, stdin=stdin, cfg=cfg), expected)
        if not ok and not tests.fraction:
            return 0.0  # the rest cannot change the verdict
        passed += ok
    return passed / len(tests.cases)


@register_scorer("code")
def code_scorer(response: str, ground_truth: Any) -> float:
    """``code`` scorer: :func:`score_code` with :data:`CODE_SCORER_CONFIG`."""
    return score_code(response, ground_truth, cfg=CODE_SCORER_CONFIG)


def _passed(result: RunResult, expected: str) -> bool:
    same = _normalize_output(result.stdout) == _normalize_output(expected)
    return result.returncode == 0 and same


def _normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")
