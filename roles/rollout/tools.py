"""Tools a policy calls while it generates (issue #18): plain typed Python functions.

A tool is a function with type hints and a Google-style docstring; its JSON schema (what a chat
template shows the model) comes from the signature (`transformers.utils.get_json_schema`). It
returns a string, the observation; whatever it raises, or a call that runs past its time limit,
becomes an error observation (counted), never a crash. Register one by name, or name it in YAML
by import path ("package.module:function"), as with algorithms:

    @TOOLS.register("word_count")
    def word_count(text: str) -> str:
        \"\"\"Count the words of a text.

        Args:
            text: the text
        \"\"\"
        return str(len(text.split()))

Built in: `calculator` (integer and decimal arithmetic, evaluated on the syntax tree: no names,
no calls, bounded powers) and `python` (runs the code in the reward's sandbox: no network, its
own temporary directory, CPU, memory and wall limits; stdout and stderr come back, truncated).
A tool that takes a keyword `sandbox` receives the rollout's sandbox limits (not the model).
"""
from __future__ import annotations

import ast
import inspect
import json
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable

from transformers.utils import get_json_schema

from core.registry import Registry
from roles.reward.sandbox import SandboxConfig, run_python

ToolFn = Callable[..., str]
TOOLS: Registry[ToolFn] = Registry("tool", importable=True)


@dataclass(frozen=True, slots=True)
class Observation:
    """What a call gave back: the text the model sees next, and how it went."""
    text: str
    status: str = "ok"
    """ok, error (the tool raised or returned no string), malformed (no parsable call),
    unknown (no such tool), timeout."""


def schema(fn: ToolFn) -> dict[str, Any]:
    """The tool's JSON schema (OpenAI function format), without the `sandbox` parameter."""
    sig = inspect.signature(fn)
    if "sandbox" not in sig.parameters:
        return get_json_schema(fn)

    def model_facing(*args: Any, **kwargs: Any) -> str:  # the signature the model sees
        raise NotImplementedError
    model_facing.__name__, model_facing.__doc__ = fn.__name__, fn.__doc__
    model_facing.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for n, p in sig.parameters.items() if n != "sandbox"])
    model_facing.__annotations__ = {k: v for k, v in inspect.get_annotations(fn, eval_str=True).items()
                                    if k != "sandbox"}
    return get_json_schema(model_facing)


def tool_schemas(names: list[str]) -> list[dict[str, Any]] | None:
    """The schemas of the named tools, for the prompt's chat template; None without tools."""
    return [schema(TOOLS.get(name)) for name in names] or None


class ToolSet:
    """The tools of a rollout, by name, each call under a wall-clock limit.

    A call runs on its own daemon thread; past `timeout_s` it returns a timeout observation and
    the rollout goes on (a Python thread cannot be killed: a tool that never returns keeps its
    thread until the process ends, so long-running tools belong in the sandbox, as `python`
    does)."""

    def __init__(self, names: list[str], *, timeout_s: float, max_chars: int,
                 sandbox: SandboxConfig | None = None) -> None:
        self.tools = {name.rpartition(":")[2] if ":" in name else name: TOOLS.get(name) for name in names}
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.sandbox = sandbox or SandboxConfig()
        self.schemas = [schema(fn) for fn in self.tools.values()]
        self._parameters = {name: list(inspect.signature(fn).parameters) for name, fn in self.tools.items()}

    def parameters(self, name: str) -> list[str]:
        """The parameter names of tool `name`, in order, without the sandbox's."""
        return [p for p in self._parameters[name] if p != "sandbox"]

    def call(self, name: str, arguments: dict[str, Any]) -> Observation:
        fn = self.tools.get(name)
        if fn is None:
            return Observation(f"error: unknown tool {name!r}; tools: {', '.join(self.tools)}", "unknown")
        if "sandbox" in self._parameters[name]:
            arguments = {**arguments, "sandbox": self.sandbox}
        done, out = run_limited(lambda: fn(**arguments), self.timeout_s, name=f"tool-{name}")
        if not done:
            return Observation(f"error: {name} timed out after {self.timeout_s:g} s", "timeout")
        if isinstance(out, Exception):  # a failing tool never stops training: the model sees the error
            return Observation(self.cut(f"error: {type(out).__name__}: {out}"), "error")
        if not isinstance(out, str):
            return Observation(f"error: {name} returned {type(out).__name__}, not a string", "error")
        return Observation(self.cut(out))

    def cut(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[:self.max_chars] + "...(truncated)"


def run_limited(fn: Callable[[], Any], timeout_s: float, *, name: str) -> tuple[bool, Any]:
    """(True, fn()'s value or the Exception it raised), or (False, None) past `timeout_s`.

    fn runs on its own daemon thread: one that never returns cannot hold up the process's exit
    (a Python thread cannot be killed, so it keeps running until then)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except Exception as e:
            box["out"] = e
    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return ("out" in box, box.get("out"))


# --------------------------------------------------------------------------- built-in tools

_BINARY: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 1000
"""The calculator refuses results longer than this (2 ** 10 ** 9 would take the machine)."""


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) * len(str(abs(int(left)) or 1)) > MAX_DIGITS:
            raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"unsupported expression: {ast.dump(node)[:80]}")


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers stay integers).

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "123 * 456"
    """
    value = _evaluate(ast.parse(expression.strip(), mode="eval"))
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    return str(value)


@TOOLS.register("python")
def python(code: str, *, sandbox: SandboxConfig) -> str:
    """Run a Python program and return what it printed (stdout, then stderr).

    Args:
        code: the program's source
        sandbox: the sandbox limits (filled in by the rollout, not by the model)
    """
    result = run_python(code, cfg=sandbox)
    text = result.stdout + (("\n" if result.stdout else "") + result.stderr if result.stderr else "")
    if result.timed_out or result.killed_by:
        text += f"\n(killed: {result.killed_by or 'wall'} limit)"
    return text


def parse_arguments(text: str) -> dict[str, Any]:
    """A call's JSON arguments object (ValueError when it is not one)."""
    args = json.loads(text)
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    return args
