"""Tests for roles/sandbox.py: hostile programs stay contained, and the ``code`` scorer.

CI runs these as root, where the sandbox has network, PID and mount namespaces and runs programs
as uid 65534; the tests that need the uid drop skip for other users. One program tries every
escape at once (module fixture ``escape``) to keep the number of sandbox runs small; the limits
are small (wall 1.5 s) so the file takes seconds.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles import sandbox
from roles.code_scorer import code_scorer, extract_program, parse_code_tests, score_code
from roles.sandbox import SANDBOX_UID, Isolation, RunResult, SandboxConfig, isolation, run_python
from roles.scorers import get_scorer

FAST = SandboxConfig(wall_seconds=1.5, cpu_seconds=30, memory_mb=256, max_processes=16)
"""Small limits; cpu_seconds above the wall limit so that loops end at the wall."""
ROOT = os.geteuid() == 0
requires_root = pytest.mark.skipif(not ROOT, reason="the uid drop needs root (CI runs as root)")
requires_namespaces = pytest.mark.skipif(not isolation().namespaces,
                                         reason="needs PID/mount namespaces (unshare)")
SECRET_ENV = "ROLEGRAPH_SANDBOX_TEST_SECRET"
pytestmark = pytest.mark.timeout(120)  # a broken group kill would otherwise hang, not fail

# Tries every escape; reports {attempt: [outcome, detail]} as JSON, outcome "ok" or the error.
ESCAPE_PROGRAM = textwrap.dedent("""
    import json, os, signal, socket, sys, time

    args = json.loads(sys.stdin.read())
    if os.fork() == 0:  # a daemon that leaves the process group: must not outlive the run
        os.setsid()
        time.sleep(60)
        os._exit(0)
    out = {}

    def attempt(name, fn):
        try:
            out[name] = ["ok", fn()]
        except BaseException as e:
            out[name] = [type(e).__name__, str(e)]

    def write(path):
        with open(path, "w") as f:
            return f.write("pwned")

    def read(path):
        with open(path) as f:
            return f.read()

    def connect(address):
        socket.create_connection(address, timeout=2).close()

    attempt("identity", lambda: [os.getuid(), os.getgid(), os.getgroups()])
    attempt("env", lambda: dict(os.environ))
    attempt("cwd", os.getcwd)
    attempt("write_cwd", lambda: write("here.txt"))
    attempt("write_tmp", lambda: write(args["outside"]))
    attempt("write_etc", lambda: write(args["etc"]))
    attempt("read_public", lambda: read(args["public"]))
    attempt("read_secret", lambda: read(args["secret"]))
    attempt("connect_parent_server", lambda: connect(("127.0.0.1", args["port"])))
    attempt("connect_outside", lambda: connect(("8.8.8.8", 53)))
    attempt("kill_parent", lambda: os.kill(os.getppid(), signal.SIGKILL))
    attempt("kill_test", lambda: os.kill(args["test_pid"], signal.SIGKILL))
    print(json.dumps(out))
""")


def assert_sandbox_works() -> None:
    """A normal program still runs normally (after something hostile)."""
    result = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                        stdin="20 22\n", cfg=FAST)
    assert (result.returncode, result.stdout, result.timed_out) == (0, "42\n", False), result


def pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is ``uid``, from /proc (this PID namespace's view)."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
            uid_line = next(line for line in lines if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue  # exited while we looked
        if int(uid_line.split()[1]) == uid:
            pids.append(int(status.parent.name))
    return pids


def wait_no_pids_of_uid(uid: int, timeout: float = 3.0) -> list[int]:
    """Processes of ``uid`` still there after ``timeout`` s (the kernel kills a namespace async)."""
    deadline = time.monotonic() + timeout
    while (pids := pids_of_uid(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


# --------------------------------------------------------------------------- normal programs


def test_runs_program_with_stdin_stdout_stderr_and_exit_code():
    code = "import sys\nprint(input()[::-1])\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    result = run_python(code, stdin="olleh\n", cfg=FAST)
    assert result == RunResult(returncode=3, stdout="hello\n", stderr="oops\n", timed_out=False,
                               seconds=result.seconds, killed_by=None)
    assert result.seconds < 1.0


def test_config_rejects_nonpositive_limits():
    with pytest.raises(ValueError, match="wall_seconds must be > 0"):
        SandboxConfig(wall_seconds=0)


# --------------------------------------------------------------------------- resource limits


def test_infinite_loop_is_killed_at_the_wall_limit():
    result = run_python("while True:\n    pass", cfg=FAST)
    assert result.timed_out and result.killed_by == "wall" and result.returncode is None
    assert FAST.wall_seconds <= result.seconds < 1.5 * FAST.wall_seconds
    assert_sandbox_works()


def test_cpu_limit_stops_a_busy_program():
    cfg = SandboxConfig(wall_seconds=8, cpu_seconds=1)
    result = run_python("while True:\n    pass", cfg=cfg)  # 1 CPU second, before the wall limit
    assert (result.returncode, result.killed_by, result.timed_out) == (-24, "SIGXCPU", False)


def test_memory_bomb_fails_with_memory_error():
    result = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", cfg=FAST)
    assert result.returncode == 1 and "MemoryError" in result.stderr and result.stdout == ""
    assert_sandbox_works()


def test_output_flood_is_cut_by_file_size_and_truncated():
    cfg = SandboxConfig(wall_seconds=5, file_size_mb=1, max_output_bytes=1000)
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)", cfg=cfg)
    assert result.stdout == "x" * 1000
    assert result.returncode == 1 and "File too large" in result.stderr  # Python ignores SIGXFSZ
    assert not result.timed_out


def test_fork_bomb_is_contained_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(bomb, cfg=FAST)
    assert result.timed_out and result.seconds < 1.5 * FAST.wall_seconds
    if ROOT:  # as another user, the sandbox uid is the caller's, which has other processes
        assert wait_no_pids_of_uid(SANDBOX_UID) == []
    assert_sandbox_works()


# --------------------------------------------------------------------------- escapes


@pytest.fixture(scope="module")
def escape() -> Iterator[tuple[RunResult, dict[str, Any], dict[str, Any]]]:
    """(result, {attempt: [outcome, detail]}, the paths and ids it was given) of ESCAPE_PROGRAM."""
    secret_fd, secret = tempfile.mkstemp(prefix="rolegraph-secret-")  # 0600, root's, in /tmp
    public_fd, public = tempfile.mkstemp(prefix="rolegraph-public-")
    os.write(secret_fd, b"the secret")
    os.write(public_fd, b"public")
    os.fchmod(public_fd, 0o644)
    server = socket.create_server(("127.0.0.1", 0))
    socket.create_connection(server.getsockname(), timeout=2).close()  # reachable from here
    server.accept()[0].close()
    server.setblocking(False)
    args = {"secret": secret, "public": public, "port": server.getsockname()[1],
            "outside": os.path.join(tempfile.gettempdir(), f"rolegraph-escape-{uuid.uuid4().hex}"),
            "etc": f"/etc/rolegraph-escape-{uuid.uuid4().hex}", "test_pid": os.getpid()}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(SECRET_ENV, "hunter2")
            result = run_python(ESCAPE_PROGRAM, stdin=json.dumps(args), cfg=FAST)
        assert result.returncode == 0, result
        args["accepted"] = _accepted(server)
        yield result, json.loads(result.stdout), args
    finally:
        for fd, path in ((secret_fd, secret), (public_fd, public)):
            os.close(fd)
            os.unlink(path)
        server.close()
        for path in (args["outside"], args["etc"]):  # only if the sandbox failed
            Path(path).unlink(missing_ok=True)


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@requires_root
def test_runs_as_nobody_without_groups(escape):
    _, out, _ = escape
    assert out["identity"] == ["ok", [SANDBOX_UID, 65534, []]]


def test_environment_is_empty(escape):
    _, out, _ = escape
    outcome, env = out["env"]
    assert outcome == "ok" and SECRET_ENV not in env and "hunter2" not in env.values()
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "LC_CTYPE"}


def test_writes_only_inside_its_directory(escape):
    _, out, args = escape
    assert out["write_cwd"] == ["ok", 5]
    assert out["write_tmp"][0] in {"OSError", "PermissionError"}  # EROFS under namespaces
    assert out["write_etc"][0] in {"OSError", "PermissionError"}
    assert not os.path.exists(args["outside"]) and not os.path.exists(args["etc"])


@requires_root
def test_cannot_read_root_only_file(escape):
    _, out, _ = escape
    assert out["read_public"] == ["ok", "public"]  # the file next to it is readable
    assert out["read_secret"][0] == "PermissionError"


def test_network_is_unreachable(escape):
    _, out, args = escape
    assert out["connect_parent_server"][0] != "ok" and out["connect_outside"][0] != "ok"
    assert not args["accepted"]  # the server never saw the sandbox connect


def test_cannot_signal_parent_or_test(escape):
    _, out, _ = escape  # this test running at all means pytest survived
    assert out["kill_parent"][0] == "PermissionError"  # the launcher, still root
    assert out["kill_test"][0] in {"PermissionError", "ProcessLookupError"}  # not in its PID ns
    assert_sandbox_works()


def test_workdir_is_removed(escape):
    _, out, _ = escape
    outcome, cwd = out["cwd"]
    assert outcome == "ok" and cwd.startswith(tempfile.gettempdir())
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))


@requires_root
@requires_namespaces
def test_daemon_that_left_the_group_dies_with_the_run(escape):
    assert wait_no_pids_of_uid(SANDBOX_UID) == []


def test_fallback_guard_blocks_network_writes_and_subprocesses(monkeypatch):
    """Where namespaces are unavailable, an audit hook refuses the same escapes."""
    fallback = Isolation(unshare=(), drop_to=(SANDBOX_UID, 65534) if ROOT else None)
    monkeypatch.setattr(sandbox, "isolation", lambda: fallback)
    outside = os.path.join(tempfile.gettempdir(), f"rolegraph-escape-{uuid.uuid4().hex}")
    code = textwrap.dedent(f"""
        import socket, subprocess
        for attempt in (lambda: socket.create_connection(("127.0.0.1", 1), timeout=1),
                        lambda: open({outside!r}, "w"),
                        lambda: subprocess.run(["true"])):
            try:
                attempt()
                print("ok")
            except PermissionError as e:
                print("refused")
        open("inside.txt", "w").write("fine")
        print(open("inside.txt").read())
    """)
    result = run_python(code, cfg=FAST)
    assert (result.returncode, result.stdout) == (0, "refused\nrefused\nrefused\nfine\n"), result
    assert not os.path.exists(outside)


# --------------------------------------------------------------------------- code scorer

SUM_TESTS = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "20 30\n", "output": "50"}]}
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()"


def fenced(program: str, tag: str = "python") -> str:
    return f"Here is my solution:\n```{tag}\n{program}\n```\nIt reads two numbers."


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
    ],
)
def test_malformed_ground_truth_raises(ground_truth, match):
    with pytest.raises(ValueError, match=match):
        parse_code_tests(ground_truth)


def test_code_scorer_is_registered():
    assert get_scorer("code") is code_scorer


def test_correct_program_scores_one_with_json_ground_truth():
    assert code_scorer(fenced(SUM_PROGRAM), json.dumps(SUM_TESTS)) == 1.0


@pytest.mark.parametrize("response", [fenced("print(a - b)"), "I think the answer is 3."])
def test_wrong_or_garbage_program_scores_zero(response):
    assert code_scorer(response, SUM_TESTS) == 0.0


def test_fraction_mode_scores_passing_fraction():
    program = "a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)"
    assert code_scorer(fenced(program), {**SUM_TESTS, "fraction": True}) == 0.5


@pytest.mark.parametrize(
    "program, expected",
    [
        ("def add(a, b):\n    return a + b", 1.0),
        ("def add(a, b):\n    return a * b", 0.0),
        ("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)", 0.0),  # exits before the asserts
    ],
)
def test_assert_mode(program, expected):
    asserts = {"assert": "assert add(1, 2) == 3\nassert add(-1, 1) == 0"}
    assert code_scorer(fenced(program), asserts) == expected


def test_program_that_never_ends_scores_zero_within_the_wall_limit():
    cfg = SandboxConfig(wall_seconds=1.0)
    start = time.monotonic()
    assert score_code(fenced("while True:\n    pass"), SUM_TESTS, cfg=cfg) == 0.0
    assert time.monotonic() - start < 2 * cfg.wall_seconds
