"""Docs that cannot drift: every `key=value` override shown in README.md and docs/*.md is a key of
the schema of the command it belongs to (launch.sft -> SFTConfig, launch.merge -> MergeConfig,
launch.bench -> BenchConfig, launch.train and launch.eval -> JobConfig; a line that names no
command: any of them). Overrides on one line are checked
together, so a slot's keys are checked against the variant the same line names
(`algorithm.name=examples.median_grpo:build_graph algorithm.scale=2.0`). Values are not
checked: docs write placeholders (`algorithm.name=<name>`, `run.stop_after=K`); a placeholder
slot name leaves the default variant in place."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.config import apply_overrides
from launch.bench import BenchConfig
from launch.config import JobConfig
from launch.merge import MergeConfig
from launch.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OVERRIDE = re.compile(r"(?<![\w./-])(?P<key>[a-z_][a-z_0-9]*(?:\.[a-z_][a-z_0-9]*)+)=(?P<value>[^\s`'\"]*)")
"""A dotted key, `=`, a value; not preceded by a path or option character (`--set x.y=1`)."""
PLACEHOLDER = re.compile(r"^(<[^>]*>|[A-Z]|N|K)$")
SCHEMAS = {"launch.sft": SFTConfig, "launch.merge": MergeConfig, "launch.bench": BenchConfig}
NOT_OVERRIDES = ("--set ",)
"""tools/gpu_check.py's own `--set stage.key=value` options are not config overrides."""


def snippets() -> list[tuple[str, int, list[type], list[str]]]:
    """(file, line, schema, overrides) for every line of the docs with overrides; a command
    continued with a backslash counts as one line."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        joined: list[tuple[int, str]] = []
        for i, line in enumerate(lines, 1):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line)
            else:
                joined.append((i, line))
        for lineno, line in joined:
            for cut in NOT_OVERRIDES:
                line = re.sub(re.escape(cut) + r"\S+", "", line)
            found = [m.group(0) for m in OVERRIDE.finditer(line)]
            if found:
                named = [s for mod, s in SCHEMAS.items() if mod in line]
                out.append((path.name, lineno, named or [JobConfig, *SCHEMAS.values()], found))
    return out


def checkable(overrides: list[str]) -> list[str]:
    """The overrides as the check takes them: a placeholder slot name left out (its keys are then
    checked against the default variant), and a value that is not YAML (a quote cut by the
    line's markup) replaced, since only keys are checked."""
    keep = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.endswith(".name") and PLACEHOLDER.match(value):
            continue
        try:
            yaml.safe_load(value)
        except yaml.YAMLError:
            value = "0"
        keep.append(f"{key}={value}")
    return keep


def test_the_docs_show_overrides_at_all():
    assert len(snippets()) > 20


@pytest.mark.parametrize("where,schemas,overrides", [(f"{f}:{n}", s, o) for f, n, s, o in snippets()],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_override_in_the_docs_is_a_schema_key(where, schemas, overrides):
    errors = []
    for schema in schemas:  # the line's command's schema, or any launcher's when it names none
        try:
            apply_overrides({}, checkable(overrides), schema=schema)
            return
        except ValueError as e:
            errors.append(f"{schema.__name__}: {e}")
    pytest.fail(f"{where}: " + "; ".join(errors))
