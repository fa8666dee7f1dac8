"""The `code` scorer: run the response's program in the sandbox and judge it outside.

The program is the last ```python fenced block of the response (else the last fenced block,
else the whole response). The ground truth is a dict, or its JSON:

* ``{"tests": [{"input": ..., "output": ...}], "fraction": false}``: stdin/stdout cases, outputs
  compared after stripping trailing whitespace per line and trailing blank lines;
* ``{"assert": "assert f(1) == 2\\n..."}``: assert statements about the program's functions.

The judge holds the expected values; the sandbox never sees them (roles/reward/sandbox/harness.py). For
stdin/stdout cases it sends only the inputs. An assert is split here, before anything runs, into
the expression the sandbox evaluates in the program's globals (``f(1)``) and a check the judge
applies to the returned value (``== 2``), on plain data (:func:`parse_asserts`), so neither a
pass token to print nor an object with a forged ``__eq__`` can pass. Supported forms, combined
with ``and``::

    assert EXPR == LITERAL      # also !=, <, <=, >, >=, in, not in; LITERAL on either side
    assert EXPR is None         # is / is not with None, True, False
    assert math.isclose(EXPR, LITERAL, rel_tol=..., abs_tol=...)
    assert abs(EXPR - LITERAL) < TOL            # or <=
    assert EXPR / assert not EXPR               # EXPR a call, name, attribute or subscript

Other top-level statements (imports, helper definitions, assignments) run in the program's
globals, in order, before the asserts after them. Any other assert, or an assert nested in
another statement, is a ValueError: it could only be checked inside the sandbox. A value that is
not plain built-in data, or an expression that raised, fails its check.

Reward 1.0 iff every test passes (or the fraction passing with ``"fraction": true``), all test
cases together within one wall-clock limit; anything the program does scores 0.0.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from roles.reward.sandbox import Case, RunResult, SandboxConfig, run_program
from roles.reward.sandbox.harness import Opaque, Raised, is_number
from roles.reward.scorers import register_scorer

_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = frozenset({"python", "python3", "py"})
_TEST_KEYS = frozenset({"tests", "assert", "fraction"})
_FORMS = ("`EXPR == LITERAL` (or !=, <, <=, >, >=, in, not in, is/is not None/True/False), "
          "`math.isclose(EXPR, LITERAL, ...)`, `abs(EXPR - LITERAL) < TOL`, `EXPR`, "
          "`not EXPR` (EXPR a call, name, attribute or subscript), joined with `and`")

_COMPARE: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda v, e: v in e), ast.NotIn: ("not in", lambda v, e: v not in e),
    ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
}
# LITERAL op EXPR, written as a test of EXPR's value
_MIRRORED: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: _COMPARE[ast.Eq], ast.NotEq: _COMPARE[ast.NotEq], ast.Lt: _COMPARE[ast.Gt],
    ast.LtE: _COMPARE[ast.GtE], ast.Gt: _COMPARE[ast.Lt], ast.GtE: _COMPARE[ast.LtE],
    ast.In: ("contains", lambda v, e: e in v), ast.NotIn: ("lacks", lambda v, e: e not in v),
    ast.Is: _COMPARE[ast.Is], ast.IsNot: _COMPARE[ast.IsNot],
}
_VALUE_NODES = (ast.Call, ast.Name, ast.Attribute, ast.Subscript)

_config = SandboxConfig()


@dataclass(frozen=True, slots=True)
class Check:
    """What the judge requires of one expression's value (the expected value stays here)."""

    source: str
    """The assert it came from, for messages."""
    test: Callable[[Any], bool]
    """Applied to the decoded plain value; an exception counts as a failure."""

    def passes(self, value: Any) -> bool:
        if isinstance(value, (Raised, Opaque)):
            return False
        try:
            return bool(self.test(value))
        except Exception:  # e.g. TypeError comparing a str with an int
            return False


@dataclass(frozen=True, slots=True)
class CodeTests:
    """A parsed ``code`` ground truth."""

    cases: tuple[tuple[str, str], ...] = ()
    """(stdin, expected stdout) pairs."""
    steps: tuple[tuple[str, str], ...] = ()
    """For asserts: ("exec", statement) / ("eval", expression) run in the sandbox, in order."""
    checks: tuple[Check, ...] = ()
    """For asserts: one per "eval" step, applied by the judge."""
    fraction: bool = False
    """Score the fraction of passing cases (or asserts) instead of all-or-nothing."""


def configure(cfg: SandboxConfig) -> None:
    """Set the sandbox limits of the registered ``code`` scorer (the reward role does, in this
    process and in each scoring worker)."""
    global _config
    _config = cfg


def sandbox_config() -> SandboxConfig:
    return _config


def extract_program(response: str) -> str:
    """The last ```python fenced block, else the last fenced block, else the whole response."""
    blocks = _FENCE_RE.findall(response)
    tagged = [body for tag, body in blocks if tag.strip().lower() in _PYTHON_TAGS]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else response


def parse_code_tests(ground_truth: Any) -> CodeTests:
    """A ``code`` ground truth (dict or JSON text) as CodeTests; ValueError if malformed."""
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
        steps, checks = parse_asserts(gt["assert"])
        return CodeTests(steps=steps, checks=checks, fraction=fraction)
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


def parse_asserts(source: str) -> tuple[tuple[tuple[str, str], ...], tuple[Check, ...]]:
    """Split assert source into sandbox steps and judge checks (module docstring's forms)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"code ground truth: 'assert' is not valid Python: {e}") from e
    steps: list[tuple[str, str]] = []
    checks: list[Check] = []
    for node in tree.body:
        if not isinstance(node, ast.Assert):
            if any(isinstance(n, ast.Assert) for n in ast.walk(node)):
                raise ValueError(f"code ground truth: asserts must be top-level statements, "
                                 f"not inside `{ast.unparse(node).splitlines()[0]}`")
            steps.append(("exec", ast.unparse(node)))
            continue
        tests = node.test.values if _is_and(node.test) else [node.test]
        for test in tests:
            expression, check = _split(test)
            steps.append(("eval", ast.unparse(expression)))
            checks.append(check)
    if not checks:
        raise ValueError("code ground truth: 'assert' holds no assert statement")
    return tuple(steps), tuple(checks)


def score_code(response: str, ground_truth: Any, *, cfg: SandboxConfig | None = None) -> float:
    """Reward in [0, 1] for the program in ``response`` against a ``code`` ground truth.

    Anything the response does scores 0.0, never raises. A malformed ground truth raises
    ValueError (a data bug, counted in ``reward/errors``); a sandbox that cannot start raises
    SandboxUnavailable, a problem of the machine that stops the run.
    """
    tests = parse_code_tests(ground_truth)
    program = extract_program(response)
    cfg = cfg or _config
    if tests.checks:
        run = run_program(program, [Case(steps=tests.steps)], cfg=cfg)
        return _assert_score(tests, run.results[0] if run.results else None)
    passed: list[bool] = []

    def keep_going(i: int, result: RunResult) -> bool:
        passed.append(_output_matches(result, tests.cases[i][1]))
        return tests.fraction or passed[-1]  # all-or-nothing: the rest cannot change it

    run_program(program, [Case(stdin=stdin) for stdin, _ in tests.cases], cfg=cfg,
                keep_going=keep_going)
    if not tests.fraction:
        return float(len(passed) == len(tests.cases) and all(passed))
    return sum(passed) / len(tests.cases)


@register_scorer("code")
def code_scorer(response: str, ground_truth: Any) -> float:
    """``code`` scorer: :func:`score_code` with the limits set by :func:`configure`."""
    return score_code(response, ground_truth, cfg=_config)


# --------------------------------------------------------------------------- judging


def _assert_score(tests: CodeTests, result: RunResult | None) -> float:
    values = (result.values if result is not None else None) or []
    passed = [check.passes(value) for check, value in zip(tests.checks, values)]
    if tests.fraction:
        return sum(passed) / len(tests.checks)
    complete = len(passed) == len(tests.checks) and result is not None and result.returncode == 0
    return float(complete and all(passed))


def _output_matches(result: RunResult, expected: str) -> bool:
    return result.returncode == 0 and _normalize(result.stdout) == _normalize(expected)


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


# --------------------------------------------------------------------------- assert forms


def _split(test: ast.expr) -> tuple[ast.expr, Check]:
    """(expression for the sandbox, check for the judge) of one assert test."""
    source = ast.unparse(test)
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        return _split_compare(test, source)
    if isinstance(test, ast.Call) and _is_isclose(test.func):
        return _split_isclose(test, source)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(
            test.operand, _VALUE_NODES):
        return test.operand, Check(source=source, test=lambda v: not v)
    if isinstance(test, _VALUE_NODES):
        return test, Check(source=source, test=bool)
    raise _unsupported(source)


def _split_compare(test: ast.Compare, source: str) -> tuple[ast.expr, Check]:
    left, op, right = test.left, type(test.ops[0]), test.comparators[0]
    difference = _abs_difference(left) if op in (ast.Lt, ast.LtE) else None
    if difference is not None:
        expression, centre = difference
        tol = _literal(right, source)
        within = operator.lt if op is ast.Lt else operator.le
        return expression, Check(source=source, test=lambda v: is_number(v) and within(
            abs(v - centre), tol))
    if _is_literal(right):
        expression, (_, fn), expected = left, _COMPARE[op], _literal(right, source)
    elif _is_literal(left):
        expression, (_, fn), expected = right, _MIRRORED[op], _literal(left, source)
    else:
        raise _unsupported(source)
    if op in (ast.Is, ast.IsNot) and expected not in (None, True, False):
        raise ValueError(f"code ground truth: `{source}`: `is` compares only with None, True "
                         f"or False")
    return expression, Check(source=source, test=lambda v: fn(v, expected))


def _split_isclose(test: ast.Call, source: str) -> tuple[ast.expr, Check]:
    if len(test.args) != 2 or any(k.arg not in ("rel_tol", "abs_tol") for k in test.keywords):
        raise _unsupported(source)
    a, b = test.args
    if _is_literal(b):
        expression, expected = a, ast.literal_eval(b)
    elif _is_literal(a):
        expression, expected = b, ast.literal_eval(a)
    else:
        raise _unsupported(source)
    tolerances = {k.arg: _literal(k.value, source) for k in test.keywords if k.arg is not None}
    return expression, Check(source=source, test=lambda v: is_number(v) and math.isclose(
        v, expected, **tolerances))


def _abs_difference(node: ast.expr) -> tuple[ast.expr, Any] | None:
    """``abs(EXPR - LITERAL)`` or ``abs(LITERAL - EXPR)`` as (EXPR, LITERAL)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "abs" and len(node.args) == 1 and not node.keywords):
        return None
    diff = node.args[0]
    if not (isinstance(diff, ast.BinOp) and isinstance(diff.op, ast.Sub)):
        return None
    if _is_literal(diff.right) and not _is_literal(diff.left):
        return diff.left, ast.literal_eval(diff.right)
    if _is_literal(diff.left) and not _is_literal(diff.right):
        return diff.right, ast.literal_eval(diff.left)
    return None


def _is_isclose(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "isclose"
            and isinstance(func.value, ast.Name) and func.value.id == "math") or (
        isinstance(func, ast.Name) and func.id == "isclose")


def _is_and(node: ast.expr) -> TypeGuard[ast.BoolOp]:
    return isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And)


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _literal(node: ast.expr, source: str) -> Any:
    if not _is_literal(node):
        raise _unsupported(source)
    return ast.literal_eval(node)


def _unsupported(source: str) -> ValueError:
    return ValueError(f"code ground truth: unsupported assert `{source}`: the judge can only "
                      f"check {_FORMS}")
