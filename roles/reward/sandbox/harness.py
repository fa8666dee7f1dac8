"""What runs inside the sandbox: the harness that runs a program once per test case, and the
runner that evaluates test expressions in the program's globals; plus the judge-side decoder.

Trust boundary. Everything here that runs in the sandbox (the ``_harness_*``, ``_runner_*`` and
``_encode`` functions, sent as ``-c`` source) is as much under the program's control as the
program itself: it is readable by the program, shares its uid, and the runner shares its
interpreter. So none of it holds an expected value or a pass token. The harness only relays:
it gets the program and the test *inputs* (stdin text, or expressions such as ``f(3)``), runs
the program in a fresh interpreter per case, and writes each case's wait status, stdout, stderr
and, for expressions, their values serialised as tagged JSON (:func:`_encode`) to the channel.
The judge (roles/reward/code_scorer.py) holds the expected values, outside the sandbox, and compares
them with what :func:`decode_values` rebuilds: plain built-in data only, so an object of the
program's (an ``__eq__`` that always says True) never reaches a comparison. A program that forges
the channel gains nothing: it would have to forge the right answers.

Channel protocol (one JSON object per line, harness -> judge): ``{"ready": true}`` once set up
(before any program runs: a harness that dies later died at the program's hands, not the
machine's), then per case ``{"started": pid}`` (the judge kills that process group in the weak
mode, which has no PID namespace) and ``{"status": wait_status, "stdout": str, "stderr": str,
"seconds": float, "values": str|null}``.
"""
from __future__ import annotations

import ctypes  # noqa: F401  (ctypes, os, resource, signal, sys, time, types: used by the

# functions sent into the sandbox, which import them there)
import inspect
import json
import math
import os
import resource  # noqa: F401
import signal  # noqa: F401
import sys
import textwrap
import time  # noqa: F401
import types
from dataclasses import dataclass
from typing import Any

PROGRAM_NAME = "main.py"
MAX_DEPTH = 100
"""Nesting depth of a value the decoder accepts."""
MAX_HASHED = 20_000
"""Set elements and dict keys the decoder builds per document (bounds crafted hash collisions)."""


@dataclass(frozen=True, slots=True)
class Raised:
    """The expression raised this exception type instead of returning a value."""

    exception: str


@dataclass(frozen=True, slots=True)
class Opaque:
    """A value that is not plain built-in data (an object of the program's own class, ...)."""


OPAQUE = Opaque()


# --------------------------------------------------------------------------- judge side


def decode_values(text: str | None) -> list[Any] | None:
    """The runner's values as plain Python data; None if absent or malformed.

    Only builtins are built (None, bool, int, float, str, bytes, complex, list, tuple, set,
    frozenset, dict) plus the :class:`Raised` / :data:`OPAQUE` markers, which equal no literal.
    """
    if text is None:
        return None
    try:
        data = json.loads(text)
        if type(data) is not list:
            return None
        budget = [MAX_HASHED]
        return [_decode(item, 0, budget) for item in data]
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None


def _decode(data: Any, depth: int, budget: list[int]) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("not an encoded value")
    (tag, body), = data.items()
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "raised" and type(body) is str:
        return Raised(body[:200])
    if tag == "opaque":
        return OPAQUE
    if type(body) is not list:
        raise ValueError(f"bad body for {tag!r}")
    if tag == "dict":
        _spend(budget, len(body))
        pairs = [(_decode(k, depth + 1, budget), _decode(v, depth + 1, budget))
                 for k, v in (_pair(p) for p in body)]
        return dict(pairs)
    items = [_decode(x, depth + 1, budget) for x in body]
    if tag == "list":
        return items
    if tag == "tuple":
        return tuple(items)
    if tag in ("set", "frozenset"):
        _spend(budget, len(items))
        return set(items) if tag == "set" else frozenset(items)
    raise ValueError(f"unknown tag {tag!r}")


def _pair(p: Any) -> tuple[Any, Any]:
    if type(p) is not list or len(p) != 2:
        raise ValueError("dict entries must be [key, value]")
    return p[0], p[1]


def _spend(budget: list[int], n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise ValueError("too many hashed elements")


def is_number(value: Any) -> bool:
    """An int or float as a test compares them (bool excluded, as a tolerance makes no sense)."""
    return type(value) in (int, float) and not (type(value) is float and math.isnan(value))


# --------------------------------------------------------------------------- in the sandbox
# The functions below run in the sandbox (``python -I -S -c``), not in this process: their source
# is sent along, so they use only the modules their _source() call imports and no other globals.
# Keep them valid on older Pythons than the caller's (the interpreter may be a system python3).


def _harness_main():
    """Read the spec, drop to the sandbox uid, run each case, report on the channel."""
    spec = json.loads(_harness_read_all(0))
    channel = spec["channel_fd"]
    # Nothing the harness inherited (bwrap's status pipe, ...) reaches the program.
    os.closerange(3, channel)
    os.closerange(channel + 1, 65536)
    os.set_inheritable(channel, False)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if spec["drop_to"] is not None:  # as root: the program never runs as the caller's uid
        _harness_drop(*spec["drop_to"])
    os.chdir(spec["workdir"])
    with open(PROGRAM_NAME, "w", encoding="utf-8", errors="replace") as f:
        f.write(spec["program"])
    # Every case's files up front, on their own tmpfs: a program that fills its workdir still
    # has its outputs recorded, and the harness never needs space later.
    files = [_harness_case_files(spec["io_dir"], case) for case in spec["cases"]]
    pythons = [p for p in spec["pythons"] if os.access(p, os.X_OK)]  # as the sandbox uid
    spec["python"] = pythons[0] if pythons else spec["pythons"][0]
    _harness_write_all(channel, b'{"ready": true}\n')
    for case, fds in zip(spec["cases"], files):
        report = _harness_case(spec, case, fds, channel)
        _harness_write_all(channel, (json.dumps(report) + "\n").encode())
        _harness_sweep(spec, report["pid"])


def _harness_drop(uid, gid):
    """Become uid:gid with no capability left in any set (bubblewrap kept SETUID, SETGID and
    SETPCAP for this): the bounding set emptied first, then the ids, then the inheritable set
    (setuid clears the others)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the kernel's last cap
    os.setgroups([])
    os.setgid(gid)  # as root these set the real, effective and saved ids
    os.setuid(uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _harness_case_files(io_dir, case):
    """stdin, stdout, stderr (and the steps and values) of one case, as unnamed files."""
    fds = [_harness_tmpfile(io_dir, case["stdin"].encode("utf-8", "replace")),
           _harness_tmpfile(io_dir), _harness_tmpfile(io_dir)]
    if case["steps"] is not None:
        fds += [_harness_tmpfile(io_dir, json.dumps(case["steps"]).encode()),
                _harness_tmpfile(io_dir)]
    return fds


def _harness_case(spec, case, fds, channel):
    """Run the program once on ``case``; its status, outputs and (with steps) values."""
    cap = spec["max_output_bytes"]
    args = ["-I", "-X", "utf8", PROGRAM_NAME]
    if case["steps"] is not None:
        args = ["-I", "-X", "utf8", "-c", spec["runner"]]
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _harness_exec(spec, fds, args)
    _harness_write_all(channel, (json.dumps({"started": pid}) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    report = {"pid": pid, "status": status, "seconds": time.monotonic() - start,
              "stdout": _harness_read_capped(fds[1], cap),
              "stderr": _harness_read_capped(fds[2], cap),
              "values": _harness_read_capped(fds[4], cap) if len(fds) > 4 else None}
    for fd in fds:
        os.close(fd)
    return report


def _harness_exec(spec, fds, args):
    """In the forked child: own process group, stdio, limits, exec. Never returns."""
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(len(fds), 65536)
        for name, limit in spec["limits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limit))
        python = spec["python"]
        os.execve(python, [python] + args, spec["env"])
    except BaseException as e:  # e.g. EAGAIN: the sample's process limit is used up
        os.write(2, ("sandbox: cannot start the program: %r\n" % (e,)).encode())
    os._exit(127)


def _harness_sweep(spec, pid):
    """Kill whatever the case left running, so nothing of it survives into the next case."""
    try:
        if spec["pid_namespace"]:
            os.kill(-1, signal.SIGKILL)  # everything this uid has in the sandbox, but the harness
        else:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _harness_tmpfile(directory, data=b""):
    """An unnamed file in ``directory`` (a tmpfs in the sandbox: counted in its memory)."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):  # no O_TMPFILE: a named file, unlinked at once
        path = os.path.join(directory, ".harness-%d-%d" % (os.getpid(), time.monotonic_ns()))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.unlink(path)
    _harness_write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _harness_read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _harness_read_capped(fd, cap):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, left = [], cap
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _harness_write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _runner_main():
    """In the program's interpreter: run main.py as __main__, then the test steps in its globals;
    write the values of the ``eval`` steps (tagged JSON) to fd 4, also when the program exits."""
    steps = json.loads(_harness_read_all(3))
    os.close(3)
    os.set_inheritable(4, False)  # the program's own children do not get it
    path = os.path.abspath(PROGRAM_NAME)
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    values = []
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
        exec(code, module.__dict__)
        for kind, text in steps:
            if kind == "exec":
                exec(compile(text, "<tests>", "exec"), module.__dict__)
                continue
            try:
                value = eval(compile(text, "<tests>", "eval"), module.__dict__)
                values.append(_encode(value, 0))
            except Exception as e:
                values.append({"raised": type(e).__name__})
    finally:
        _harness_write_all(4, json.dumps(values).encode())


def _encode(value, depth):
    """Tagged JSON for plain built-in data; exact types only, so no subclass passes as one."""
    t = type(value)
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        return value if -2 ** 63 <= value < 2 ** 63 else {"int": hex(value)}
    if depth > 100:
        return {"opaque": True}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [value.real, value.imag]}
    if t is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    tags = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
    if t in tags:
        return {tags[t]: [_encode(x, depth + 1) for x in value]}
    return {"opaque": True}


def _source(*functions: Any, imports: str, call: str) -> str:
    """Stand-alone ``-c`` source: the imports, the constants, the functions, then the call."""
    parts = [f"import {imports}", f"PROGRAM_NAME = {PROGRAM_NAME!r}"]
    parts += [textwrap.dedent(inspect.getsource(fn)) for fn in functions]
    return "\n".join([*parts, call, ""])


HARNESS_SOURCE = _source(
    _harness_main, _harness_drop, _harness_case_files, _harness_case, _harness_exec,
    _harness_sweep, _harness_tmpfile, _harness_read_all, _harness_read_capped, _harness_write_all,
    imports="ctypes, json, os, resource, signal, sys, time", call="_harness_main()")
"""Source of the harness (``python -I -S -c``)."""
RUNNER_SOURCE = _source(
    _runner_main, _encode, _harness_read_all, _harness_write_all,
    imports="json, os, sys, types", call="_runner_main()")
"""Source of the runner, the program's interpreter in expression mode (``python -I -c``)."""
