"""Tests for roles/sandbox*.py and the ``code`` scorer's judge (roles/reward/code_scorer.py).

The attacks of issue #13, as root and as an unprivileged user, are in test_sandbox_attacks.py;
this file covers how the sandbox and the judge work: cases and limits, the runtime it shows, the
values that come back as plain data, the seccomp program, cleanup in the weak mode, and every
assert form the judge accepts. Small limits keep it fast.
"""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from roles.reward import sandbox
from roles.reward.sandbox import cgroup as sandbox_cgroup
from roles.reward.code_scorer import (code_scorer, configure, extract_program, parse_code_tests,
                               sandbox_config, score_code)
from roles.reward.sandbox import (Case, RunResult, SandboxConfig, SandboxUnavailable, isolation,
                           run_program, run_python, weak_samples)
from roles.reward.sandbox.harness import OPAQUE, Raised, decode_values
from roles.reward.sandbox.seccomp import seccomp_filter
from roles.reward.sandbox.weak import remove_tree
from roles.reward.scorers import get_scorer

FAST = SandboxConfig(wall_seconds=2.0, cpu_seconds=30, memory_mb=256, disk_mb=16,
                     max_processes=16)
"""Small limits; cpu_seconds above the wall limit so that loops end at the wall."""
ROOT = os.geteuid() == 0
pytestmark = pytest.mark.timeout(120)


def _available() -> str | None:
    try:
        isolation(SandboxConfig())
    except SandboxUnavailable as e:
        return str(e)
    return None


requires_sandbox = pytest.mark.skipif(_available() is not None, reason=str(_available()))


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


# --------------------------------------------------------------------------- running programs


@requires_sandbox
def test_runs_program_with_stdin_stdout_stderr_and_exit_code():
    code = "import sys\nprint(input()[::-1])\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    result = run_python(code, stdin="olleh\n", cfg=FAST)
    assert result == RunResult(returncode=3, stdout="hello\n", stderr="oops\n", timed_out=False,
                               seconds=result.seconds, killed_by=None)
    assert result.seconds < 1.0


def test_config_rejects_nonpositive_limits():
    with pytest.raises(ValueError, match="wall_seconds must be > 0"):
        SandboxConfig(wall_seconds=0)
    with pytest.raises(ValueError, match="disk_mb must be > 0"):
        SandboxConfig(disk_mb=-1)


@requires_sandbox
def test_cases_run_in_one_sandbox_with_fresh_processes():
    """The workdir is the sample's (files stay between cases), processes are not: whatever a
    case leaves running is killed before the next one starts."""
    code = program("""
        import os, sys, time
        case = input()
        if case == "1":
            open("note", "w").write("from case 1")
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
        print(case, open("note").read(), len([p for p in os.listdir("/proc") if p.isdigit()]))
    """)
    run = run_program(code, [Case(stdin="1"), Case(stdin="2")], cfg=FAST)
    outs = [r.stdout.split(maxsplit=1) for r in run.results]
    assert [o[0] for o in outs] == ["1", "2"] and not run.timed_out
    assert outs[1][1].startswith("from case 1")
    assert int(outs[1][1].split()[-1]) <= 3  # reaper, harness, itself: case 1's child is gone


@requires_sandbox
def test_keep_going_stops_the_sample():
    seen = []

    def keep_going(i: int, result: RunResult) -> bool:
        seen.append(i)
        return False

    run = run_program("print(input())", [Case(stdin=str(i)) for i in range(5)], cfg=FAST,
                      keep_going=keep_going)
    assert seen == [0] and [r.stdout for r in run.results] == ["0\n"]


@requires_sandbox
def test_wall_limit_is_for_the_whole_sample():
    start = time.monotonic()
    run = run_program("import time\ntime.sleep(0.8)\nprint('done')",
                      [Case() for _ in range(4)], cfg=FAST)
    took = time.monotonic() - start
    assert run.timed_out and len(run.results) == 3  # 2 finished, the third cut off
    assert run.results[-1] == RunResult(returncode=None, stdout="", stderr="", timed_out=True,
                                        seconds=run.results[-1].seconds, killed_by="wall")
    assert FAST.wall_seconds <= took < FAST.wall_seconds + 1.5


@requires_sandbox
@pytest.mark.parametrize("code, check", [
    ("x = bytearray(10 * 1024**3)", lambda r: "MemoryError" in r.stderr and r.returncode == 1),
    ("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)",
     lambda r: r.stdout == "x" * 1000 and "File too large" in r.stderr),
    ("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))",
     lambda r: "No space left on device" in r.stderr),  # the outputs have their own room
])
def test_memory_output_and_disk_limits(code, check):
    cfg = SandboxConfig(wall_seconds=5, memory_mb=256, disk_mb=16, file_size_mb=1,
                        max_output_bytes=1000)
    result = run_python(code, cfg=cfg)
    assert check(result), result
    assert not result.timed_out


@requires_sandbox
def test_cpu_limit_stops_a_busy_program():
    result = run_python("while True:\n    pass", cfg=SandboxConfig(wall_seconds=8, cpu_seconds=1))
    assert (result.returncode, result.killed_by, result.timed_out) == (-24, "SIGXCPU", False)


@requires_sandbox
def test_standard_library_is_complete_and_nothing_else_is_there():
    """Every extension module of the interpreter loads (their shared libraries are bound), and
    the packages of the trainer's environment are not importable."""
    code = program("""
        import importlib, json, os, sys, sysconfig
        dynload = sysconfig.get_config_var("DESTSHARED")
        names = sorted({f.split(".")[0] for f in os.listdir(dynload) if f.endswith(".so")
                        and not f.startswith("_tkinter")})
        failed = {}
        for name in names + ["ssl", "sqlite3", "decimal", "ctypes", "lzma", "hashlib", "zlib"]:
            try:
                importlib.import_module(name)
            except Exception as e:
                failed[name] = repr(e)
        present = []
        for name in ("torch", "pytest", "numpy", "roles", "yaml"):
            try:
                importlib.import_module(name)
                present.append(name)
            except ImportError:
                pass
        print(json.dumps({"modules": len(names), "failed": failed, "present": present}))
    """)
    result = run_python(code, cfg=SandboxConfig(wall_seconds=20))
    report = json.loads(result.stdout)
    assert report["modules"] > 20 and report["failed"] == {} and report["present"] == []


# --------------------------------------------------------------------------- values and codec


@requires_sandbox
def test_values_come_back_as_plain_data():
    code = "class Mine:\n    pass\nclass MyInt(int):\n    pass\ndeep = [[[[[[1]]]]]]\n"
    expressions = ["None", "True", "3", "-2**70", "1.5", "float('nan')", "float('-inf')",
                   "'s\\u00e9'", "b'\\x00\\xff'", "1+2j", "[1, (2, 3)]", "{1: 'a', (1, 2): [3]}",
                   "{1, 2}", "frozenset({3})", "deep", "Mine()", "MyInt(3)", "1/0"]
    steps = tuple(("eval", e) for e in expressions)
    run = run_program(code, [Case(steps=(("exec", "import math"), *steps))], cfg=FAST)
    values = run.results[0].values
    assert values[:5] == [None, True, 3, -2**70, 1.5]
    assert math.isnan(values[5]) and values[6] == -math.inf
    assert values[7:15] == ["s\u00e9", b"\x00\xff", 1 + 2j, [1, (2, 3)], {1: "a", (1, 2): [3]},
                            {1, 2}, frozenset({3}), [[[[[[1]]]]]]]
    assert type(values[10][1]) is tuple and type(values[13]) is frozenset
    assert values[15:] == [OPAQUE, OPAQUE, Raised("ZeroDivisionError")]  # a subclass is opaque


@pytest.mark.parametrize("text", [
    None, "", "not json", "{}", '[{"list": 1}]', '[{"nope": []}]', '[{"set": [{"list": []}]}]',
    "[" * 200 + "]" * 200, '[{"dict": [[1]]}]',
    json.dumps([{"set": list(range(30_000))}]),  # more hashed elements than the budget
    json.dumps([{"list": [{"list": [{"list": []}]}]}] * 1)[:-3],
])
def test_decode_values_rejects_malformed_documents(text):
    assert decode_values(text) is None


def test_decode_values_builds_only_builtins():
    values = decode_values('[{"tuple": [1, {"frozenset": ["a"]}]}, {"int": "-0x10"}, '
                           '{"opaque": true}, {"raised": "KeyError"}]')
    assert values == [(1, frozenset({"a"})), -16, OPAQUE, Raised("KeyError")]


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_assembles(machine):
    bpf = seccomp_filter(machine)
    assert len(bpf) % 8 == 0 and 40 < len(bpf) // 8 < 255  # jump offsets are 8 bits


def test_seccomp_filter_refuses_unknown_architectures():
    with pytest.raises(ValueError, match="no syscall table for 'riscv64'.*x86_64, aarch64"):
        seccomp_filter("riscv64")


def test_cgroup_v2_without_controllers_is_reported():
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.controllers").exists() or "memory" in (
            unified / "cgroup.controllers").read_text():
        pytest.skip("needs a cgroup2 mount without the memory controller (a hybrid layout)")
    with pytest.raises(LookupError, match="lacks the memory, pids controller"):
        sandbox_cgroup._find_v2(unified, "/", "rolegraph-sandbox-test")


def test_refusal_names_the_missing_piece():
    with pytest.raises(SandboxUnavailable, match="bubblewrap .*/nonexistent/bwrap.* not installed"
                                                 ".*allow_weak=true"):
        isolation(SandboxConfig(bwrap="/nonexistent/bwrap"))
    with pytest.raises(SandboxUnavailable, match="interpreter 'no-such-python' not found"):
        run_python("print(1)", cfg=SandboxConfig(python="no-such-python"))


def test_refuses_a_bubblewrap_too_old(tmp_path):
    old = tmp_path / "bwrap"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "bubblewrap 0.6.1" && exit 0\n'
                   'exec bwrap "$@"\n')
    old.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="bubblewrap 0.6.1 is too old: 0.8.0 or newer"):
        isolation(SandboxConfig(bwrap=str(old)))


@pytest.mark.skipif(sandbox_cgroup.cgroups() is None, reason="needs usable cgroups (root)")
def test_cgroups_of_dead_scoring_processes_are_removed():
    hierarchy = sandbox_cgroup.cgroups()
    orphans = [parent.parent / f"{sandbox_cgroup.PREFIX}999999999.1" for parent in
               {hierarchy.memory_parent, hierarchy.pids_parent}]
    for orphan in orphans:  # a parent left by a process that no longer exists
        (orphan / "7").mkdir(parents=True)
    live = sandbox_cgroup.create(hierarchy, memory_bytes=64 << 20, max_processes=4)
    try:
        assert sandbox_cgroup.remove_orphans() == 1
        assert not any(o.exists() for o in orphans)
        assert all(Path(f).exists() for f in live.procs_files)  # ours: its owner is alive
    finally:
        live.remove()


def make_deep_tree(top: Path, depth: int = 3000) -> Path:
    """A tree deeper than PATH_MAX, with 000 directories, symlinks, a fifo; returns a file
    outside it that a symlink inside points to (it must survive removal)."""
    outside = top.parent / f"{top.name}-outside"
    outside.write_text("keep me")
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        if i % 1000 == 0:
            os.symlink(outside, "link", dir_fd=child)
            os.symlink("/", "root", dir_fd=child)
            os.mkfifo("fifo", dir_fd=child)
        os.chmod(fd, 0)
        os.close(fd)
        fd = child
    os.close(fd)
    return outside


def test_remove_tree_handles_depth_permissions_and_symlinks(tmp_path):
    outside = make_deep_tree(tmp_path / "work")
    remove_tree(str(tmp_path / "work"))
    assert not (tmp_path / "work").exists() and outside.read_text() == "keep me"
    remove_tree(str(tmp_path / "work"))  # already gone: fine


def test_weak_mode_runs_only_when_allowed_and_cleans_up():
    """allow_weak with no bubblewrap: plain processes, counted, workdir removed whatever it
    holds (a deep tree, 000 directories), the program's leftovers killed."""
    code = program("""
        import os, time
        for i in range(1500):
            os.mkdir("d")
            os.chdir("d")
        os.chdir(os.environ["HOME"])
        os.chmod("d", 0)
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        print(os.getcwd(), os.getuid())
    """)
    cfg = SandboxConfig(wall_seconds=10, bwrap="/nonexistent/bwrap", allow_weak=True)
    before = weak_samples()
    result = run_python(code, cfg=cfg)
    workdir, uid = result.stdout.split()
    assert result.returncode == 0 and weak_samples() == before + 1
    assert not os.path.exists(workdir) and (int(uid) == 65534) == ROOT
    if ROOT:  # its forked child is gone too (as another user, its uid has other processes)
        assert wait_no_processes_of(65534) == []


def wait_no_processes_of(uid: int, timeout: float = 3.0) -> list[int]:
    """Processes whose real uid is ``uid`` still there after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if int(line.split()[1]) == uid:
                pids.append(int(status.parent.name))
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.05)


# --------------------------------------------------------------------------- the judge

SUM_TESTS = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "20 30\n", "output": "50"}]}
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()"


def fenced(source: str, tag: str = "python") -> str:
    return f"Here is my solution:\n```{tag}\n{source}\n```\nIt reads two numbers."


@pytest.mark.parametrize(
    "response, expected",
    [
        (fenced("print(1)"), "print(1)\n"),
        ("```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```", "print(2)\n"),
        ("```python\nprint(1)\n```\nrun it:\n```bash\npython a.py\n```", "print(1)\n"),
        ("```\nprint(3)\n```", "print(3)\n"),
        ("print(4)", "print(4)"),
    ],
)
def test_extract_program(response, expected):
    assert extract_program(response) == expected


@pytest.mark.parametrize(
    "ground_truth, match",
    [
        ({"tests": []}, "non-empty list"),
        ({"tests": [{"input": "1"}]}, r"tests\[0\]"),
        ({"assert": "assert True", "tests": SUM_TESTS["tests"]}, "exactly one"),
        ({"asserts": "assert True"}, "unknown keys"),
        ("[1, 2]", "dict or JSON object"),
        ({"assert": "assert f(1) == g(2)"}, "unsupported assert `f\\(1\\) == g\\(2\\)`"),
        ({"assert": "assert f(1) > g(1)"}, "unsupported assert"),
        ({"assert": "assert f(1) == 2 or f(2) == 3"}, "unsupported assert"),
        ({"assert": "assert f(1) is 3"}, "`is` compares only with None, True or False"),
        ({"assert": "expected = 3\nassert f(1) == expected"}, "unsupported assert"),
        ({"assert": "for i in range(3):\n    assert f(i) == i"}, "top-level statements"),
        ({"assert": "def check():\n    assert f(1) == 2\ncheck()"}, "top-level statements"),
        ({"assert": "x = f(1)"}, "holds no assert"),
        ({"assert": "assert f(1) =="}, "not valid Python"),
    ],
)
def test_malformed_ground_truth_raises(ground_truth, match):
    with pytest.raises(ValueError, match=match):
        parse_code_tests(ground_truth)


def test_asserts_never_send_an_expected_value_to_the_sandbox():
    tests = parse_code_tests({"assert": "import math\nassert f(7) == 'rg-expected'\n"
                                        "assert math.isclose(g(1), 2.718, rel_tol=1e-3)"})
    sent = json.dumps(tests.steps)
    assert "rg-expected" not in sent and "2.718" not in sent
    assert tests.steps == (("exec", "import math"), ("eval", "f(7)"), ("eval", "g(1)"))


def test_code_scorer_is_registered_and_configurable():
    assert get_scorer("code") is code_scorer
    old = sandbox_config()
    try:
        configure(FAST)
        assert sandbox_config() is FAST
    finally:
        configure(old)


@requires_sandbox
def test_correct_program_scores_one_with_json_ground_truth():
    assert score_code(fenced(SUM_PROGRAM), json.dumps(SUM_TESTS), cfg=FAST) == 1.0


@requires_sandbox
@pytest.mark.parametrize("response", [fenced("print(a - b)"), "I think the answer is 3."])
def test_wrong_or_garbage_program_scores_zero(response):
    assert score_code(response, SUM_TESTS, cfg=FAST) == 0.0


@requires_sandbox
def test_fraction_mode_scores_passing_fraction():
    source = "a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)"
    assert score_code(fenced(source), {**SUM_TESTS, "fraction": True}, cfg=FAST) == 0.5


ASSERT_FORMS = textwrap.dedent("""
    import math
    LIMIT = 10
    assert add(1, 2) == 3
    assert 3 == add(1, 2)
    assert add(1, 2) != 4 and add(2, 2) >= 4 and 5 > add(2, 2)
    assert add(1, 1) in (2, 3) and 2 in [add(1, 1)] and 9 not in [add(1, 1)]
    assert add(0.1, 0.2) != 0.3
    assert math.isclose(add(0.1, 0.2), 0.3)
    assert math.isclose(0.3, add(0.1, 0.2), rel_tol=1e-9, abs_tol=0.0)
    assert abs(add(0.1, 0.2) - 0.3) < 1e-9
    assert abs(0.3 - add(0.1, 0.2)) <= 1e-9
    assert add([1], [2]) == [1, 2] and add((1,), (2,)) == (1, 2)
    assert add(-LIMIT, LIMIT) is not None
    assert is_even(add(1, 1))
    assert not is_even(add(1, 2))
    assert table()[2] == 'b' and table() == {1: 'a', 2: 'b'}
""")
GOOD = "def add(a, b):\n    return a + b\ndef is_even(x):\n    return x % 2 == 0\n" \
       "def table():\n    return {1: 'a', 2: 'b'}"


@requires_sandbox
@pytest.mark.parametrize("source, expected", [
    (GOOD, 1.0),
    (GOOD.replace("a + b", "a * b if a != 1 else a + b"), 0.0),
    (GOOD.replace("x % 2 == 0", "True"), 0.0),
    (GOOD.replace("'b'}", "'c'}"), 0.0),
    (GOOD + "\nimport sys\nsys.exit(0)", 0.0),  # exits before the asserts run
    (GOOD + "\nraise SystemExit(1)", 0.0),
])
def test_assert_forms(source, expected):
    assert score_code(fenced(source), {"assert": ASSERT_FORMS}, cfg=FAST) == expected


@requires_sandbox
def test_assert_fraction_and_failing_expressions():
    truth = {"assert": "assert f(1) == 1\nassert f(2) == 2\nassert f(0) == 0\nassert f(3) == 9",
             "fraction": True}
    assert score_code(fenced("def f(x):\n    return 1 / x * x * x if x < 3 else 0"), truth,
                      cfg=FAST) == 0.5  # f(0) raised, f(3) was wrong


@requires_sandbox
def test_program_that_never_ends_scores_zero_within_the_wall_limit():
    start = time.monotonic()
    assert score_code(fenced("while True:\n    pass"), SUM_TESTS, cfg=FAST) == 0.0
    assert time.monotonic() - start < FAST.wall_seconds + 1.5


@requires_sandbox
def test_sandbox_setup_failure_is_not_a_zero_reward(monkeypatch):
    """A sandbox that cannot start raises (the machine's problem), never a silent 0."""
    monkeypatch.setattr(sandbox, "_failures", {})
    cfg = SandboxConfig(wall_seconds=5, python=sys.executable)
    monkeypatch.setattr(sandbox, "HARNESS_SOURCE", "raise SystemExit('harness broken')")
    with pytest.raises(SandboxUnavailable, match="did not start .*harness broken"):
        run_python("print(1)", cfg=cfg)
