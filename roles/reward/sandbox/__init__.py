"""Run untrusted Python programs, one *sample* at a time, in a bubblewrap sandbox.

:func:`run_program` runs a program once per test case (a stdin text, or test expressions to
evaluate in its globals) inside one sandbox per sample and returns, per case, its exit status,
stdout, stderr and the expressions' values as plain data. The ``code`` scorer
(roles/reward/code_scorer.py) is the judge that compares them with the expected values, which never
enter the sandbox (see roles/reward/sandbox/harness.py for that boundary).

Isolation (roles/reward/sandbox/bwrap.py, roles/reward/sandbox/seccomp.py): the program sees a read-only root
with only its interpreter, standard library and their shared libraries, a new /proc and a minimal
/dev, and a size-limited tmpfs workdir; no host file, no host socket of any family (private
network namespace, and a seccomp filter allowing only AF_UNIX/AF_INET/AF_INET6 sockets, which
the namespaces confine); an empty environment; uid 65534 (host ``nobody`` when the caller is
root, else a fresh uid in a user namespace: the caller's uid is never kept); no capabilities,
``no_new_privs``; and the whole process tree dies with the scoring process.

Limits, per sample (roles/reward/sandbox/cgroup.py): memory of the whole process tree, memfd, tmpfs and
kernel memory included, and the number of processes, through the memory and pids cgroups where
they can be used (as root); one wall-clock limit for the whole sample across all its cases;
the workdir's size. Per process: CPU seconds, address space, file size, open files, no core
dumps. Without usable cgroups (not root, or none mounted), memory is limited per process only
(RLIMIT_AS, RLIMIT_FSIZE per file, the tmpfs size: a tree of processes can hold about
``max_processes`` times ``memory_mb``) and processes per sample through RLIMIT_NPROC, which
counts per user namespace, so per sample; a line in the log says so once.

If the sandbox cannot start (no bubblewrap, user or mount namespaces disabled, an architecture
without a seccomp table), :func:`isolation` raises :class:`SandboxUnavailable` naming the missing
piece, unless ``allow_weak`` is set: then programs run as plain processes (roles/reward/sandbox/weak.py)
and each sample is counted in :func:`weak_samples` (the reward role reports
``reward/sandbox_weak``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import above
from roles.reward.sandbox import cgroup as sandbox_cgroup
from roles.reward.sandbox import weak as sandbox_weak
from roles.reward.sandbox.bwrap import (
    IO_DIR,
    SANDBOX_GID,
    SANDBOX_UID,
    WORKDIR,
    SandboxUnavailable,
    bwrap_args,
    join_cgroups_prefix,
    runtime,
)
from roles.reward.sandbox.harness import HARNESS_SOURCE, RUNNER_SOURCE, decode_values
from roles.reward.sandbox.seccomp import seccomp_filter
from roles.reward.sandbox.watch import Watch

__all__ = ["SANDBOX_UID", "Case", "RunResult", "SampleRun", "SandboxConfig", "SandboxUnavailable",
           "isolation", "run_program", "run_python", "weak_samples"]

logger = logging.getLogger(__name__)

STRONG, WEAK = "bwrap", "weak"
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")  # weak mode, as root
MIN_BWRAP = (0, 8, 0)
"""Oldest bubblewrap with everything used here (--size 0.7.0, --disable-userns 0.8.0)."""
_OWN_PROCESSES = 3  # bwrap, its PID-1 reaper and the harness, besides the program's own
_weak_samples = 0


@dataclass(kw_only=True, slots=True)
class SandboxConfig:
    wall_seconds: float = 10.0
    """Wall-clock limit for the whole sample (all its test cases), from the sandbox's start."""
    cpu_seconds: float = 5.0
    """CPU seconds per process (RLIMIT_CPU, rounded up): SIGXCPU, then SIGKILL 1 s later."""
    memory_mb: int = 512
    """Memory of the sample's whole process tree (cgroup); also each process's address space."""
    disk_mb: int = 64
    """Size of the sample's workdir (a tmpfs), the only place it can write."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), its stdout and stderr included."""
    max_processes: int = 32
    """Processes and threads the sample may have at once (pids cgroup or RLIMIT_NPROC)."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 1_000_000
    """stdout, stderr and the values of each case are each cut to this many bytes."""
    python: str = sys.executable
    """Interpreter for programs; only it and its standard library are visible in the sandbox."""
    bwrap: str = "bwrap"
    """bubblewrap executable (a name on PATH or a path)."""
    allow_weak: bool = False
    """Where bubblewrap cannot start, run programs as plain processes (not isolated) instead of
    refusing; every such sample is counted as ``reward/sandbox_weak``."""

    def __post_init__(self) -> None:
        above(self, 0, "wall_seconds", "cpu_seconds", "memory_mb", "disk_mb", "file_size_mb",
              "max_processes", "open_files", "max_output_bytes")


@dataclass(frozen=True, slots=True)
class Case:
    """One run of the program: its stdin, and optionally test steps run after it."""

    stdin: str = ""
    steps: tuple[tuple[str, str], ...] | None = None
    """("exec", statement) or ("eval", expression) pairs run in the program's globals after it;
    the values of the "eval" ones come back in :attr:`RunResult.values`."""


@dataclass(frozen=True, slots=True)
class RunResult:
    returncode: int | None
    """Exit code; -N when killed by signal N; None when it did not finish (wall limit)."""
    stdout: str
    """Captured stdout (UTF-8, undecodable bytes replaced), at most max_output_bytes bytes."""
    stderr: str
    """Captured stderr, like stdout."""
    timed_out: bool
    """Still running when the sample's wall-clock limit ended it."""
    seconds: float
    """Wall-clock seconds of this run."""
    killed_by: str | None
    """"wall" for the wall limit, else the signal's name (SIGXCPU: the CPU limit; SIGKILL: the
    CPU hard limit or the OOM killer); None when the program exited by itself."""
    values: list[Any] | None = None
    """The "eval" steps' values as plain data (roles/reward/sandbox/harness.py), None without steps or
    when the program never got to write them."""


@dataclass(frozen=True, slots=True)
class SampleRun:
    results: tuple[RunResult, ...]
    """One per case that ran, in order; fewer than the cases when stopped or out of time."""
    timed_out: bool
    """The sample's wall-clock limit ended it."""
    seconds: float
    isolation: str
    """"bwrap" or "weak"."""
    limits: dict[str, float] = field(default_factory=dict)
    """From the sample's cgroup: memory_peak_mb, oom_kills, forks_refused (empty without)."""


def weak_samples() -> int:
    """Samples this process has run in the weak mode so far."""
    return _weak_samples


def isolation(cfg: SandboxConfig) -> str:
    """"bwrap" (after a trial program ran in it, once per process), or "weak" when it cannot
    start and ``cfg.allow_weak``; else SandboxUnavailable naming the missing piece."""
    return _mode(cfg, trial=True)


def run_program(program: str, cases: Sequence[Case], *, cfg: SandboxConfig,
                keep_going: Callable[[int, RunResult], bool] | None = None) -> SampleRun:
    """Run ``program`` on each case in one sandbox, under one wall-clock limit.

    ``keep_going(i, result)`` is called as each case ends; False stops the sample there (the
    sandbox is killed). Never raises for anything the program does; SandboxUnavailable when the
    sandbox cannot start (a problem of the machine, not of the program).
    """
    global _weak_samples
    if not cases:
        raise ValueError("run_program needs at least one case")
    if _mode(cfg, trial=False) == STRONG:  # no trial: a sandbox that fails to start says so
        try:
            return _run(program, cases, cfg, strong=True, keep_going=keep_going)
        except SandboxUnavailable as e:
            _failures[(cfg.bwrap, cfg.python)] = str(e)
            _mode(cfg, trial=False)  # raises, unless allow_weak
    _weak_samples += 1
    return _run(program, cases, cfg, strong=False, keep_going=keep_going)


def run_python(code: str, *, stdin: str = "", cfg: SandboxConfig) -> RunResult:
    """Run ``code`` once with ``stdin``: :func:`run_program` with one case."""
    run = run_program(code, [Case(stdin=stdin)], cfg=cfg)
    if run.results:
        return run.results[0]
    return RunResult(returncode=None, stdout="", stderr="", timed_out=run.timed_out,
                     seconds=run.seconds, killed_by="wall" if run.timed_out else None)


# --------------------------------------------------------------------------- probing

_failures: dict[tuple[str, str], str] = {}
"""(bwrap, python) -> why a sandbox failed to start in this process."""
_trialled: set[tuple[str, str]] = set()


def _mode(cfg: SandboxConfig, *, trial: bool) -> str:
    key = (cfg.bwrap, cfg.python)
    if trial and key not in _trialled and not _static_problem(*key):
        _trialled.add(key)
        _trial(cfg)
    reason = _static_problem(*key) or _failures.get(key)
    if reason is None:
        return STRONG
    if not cfg.allow_weak:
        raise SandboxUnavailable(
            f"code sandbox unavailable: {reason}. Install bubblewrap (apt-get install "
            f"bubblewrap) on a kernel that allows user and mount namespaces, or set "
            f"reward.sandbox.allow_weak=true to run programs WITHOUT isolation")
    _warn_weak(reason)
    return WEAK


@functools.cache
def _static_problem(bwrap: str, python: str) -> str | None:
    """What is missing for the bubblewrap sandbox, short of running it (None: nothing)."""
    if shutil.which(bwrap) is None:
        return f"bubblewrap ({bwrap!r}) is not installed"
    if (version := _bwrap_version(bwrap)) < MIN_BWRAP:
        return (f"bubblewrap {'.'.join(map(str, version))} is too old: "
                f"{'.'.join(map(str, MIN_BWRAP))} or newer is needed (--size, --disable-userns)")
    try:
        seccomp_filter()
        runtime(python)
    except (ValueError, SandboxUnavailable) as e:
        return str(e)
    return None


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    """From ``bwrap --version`` ("bubblewrap 0.8.0"); (0,) if it cannot be read."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.split()
        return tuple(int(x) for x in out[-1].split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return (0,)


def _trial(cfg: SandboxConfig) -> None:
    """Run a trial program; a failure is recorded in _failures."""
    key = (cfg.bwrap, cfg.python)
    trial_cfg = SandboxConfig(python=cfg.python, bwrap=cfg.bwrap, wall_seconds=60)
    try:
        run = _run("print('ok')", [Case()], trial_cfg, strong=True)
    except SandboxUnavailable as e:
        _failures[key] = str(e)
        return
    if [(r.returncode, r.stdout) for r in run.results] != [(0, "ok\n")]:
        _failures[key] = f"a trial program did not run in the sandbox: {run.results}"
        return
    logger.info("sandbox: bubblewrap isolation works (%s, %.2f s for a trial program)",
                runtime(cfg.python).python, run.seconds)


@functools.cache
def _warn_weak(reason: str) -> None:
    logger.warning("sandbox: WEAK MODE (allow_weak): %s; programs run without isolation, every "
                   "sample is counted as reward/sandbox_weak", reason)


# --------------------------------------------------------------------------- one sample


def _run(program: str, cases: Sequence[Case], cfg: SandboxConfig, *, strong: bool,
         keep_going: Callable[[int, RunResult], bool] | None = None) -> SampleRun:
    start = time.monotonic()
    with contextlib.ExitStack() as stack:  # unwinds in reverse: processes, then files, cgroup
        group = _sample_cgroup(cfg, stack)
        if strong:
            workdir, python = WORKDIR, runtime(cfg.python).python
        else:
            workdir = sandbox_weak.make_workdir((SANDBOX_UID, SANDBOX_GID) if _as_root() else None)
            stack.callback(sandbox_weak.remove_tree, workdir)
            python = os.path.realpath(shutil.which(cfg.python) or cfg.python)
        channel_r, channel_w = os.pipe()
        stack.callback(os.close, channel_r)
        spec = _spec(program, cases, cfg, workdir=workdir, python=python, channel_fd=channel_w,
                     strong=strong, nproc_limit=group is None)
        proc, status_r, err_f = _launch(spec, cfg, stack, python=python, strong=strong,
                                        channel_w=channel_w, group=group,
                                        io_bytes=_io_bytes(cases, cfg))
        watch = stack.enter_context(Watch(proc, channel_r, status_r))
        results, timed_out = _collect(watch, cases, cfg, start + cfg.wall_seconds, keep_going)
        watch.end()
        if not watch.ready and not timed_out:
            err_f.seek(0)
            raise SandboxUnavailable(f"the sandbox did not start (exit {proc.returncode}): "
                                     f"{err_f.read(4000).decode(errors='replace').strip()}")
        limits = group.stats() if group is not None else {}
    return SampleRun(results=tuple(results), timed_out=timed_out, seconds=time.monotonic() - start,
                     isolation=STRONG if strong else WEAK, limits=limits)


def _as_root() -> bool:
    return os.geteuid() == 0


def _sample_cgroup(cfg: SandboxConfig,
                   stack: contextlib.ExitStack) -> sandbox_cgroup.SampleCgroup | None:
    hierarchy = sandbox_cgroup.cgroups()
    if hierarchy is None:
        return None
    group = sandbox_cgroup.create(hierarchy, memory_bytes=cfg.memory_mb << 20,
                                  max_processes=cfg.max_processes + _OWN_PROCESSES)
    stack.callback(group.remove)
    return group


def _launch(spec: dict[str, Any], cfg: SandboxConfig, stack: contextlib.ExitStack, *,
            python: str, strong: bool, channel_w: int,
            group: sandbox_cgroup.SampleCgroup | None,
            io_bytes: int) -> tuple[subprocess.Popen, int | None, Any]:
    """Start the sandbox with the harness reading ``spec``: (process, status pipe, stderr)."""
    spec_f = stack.enter_context(tempfile.TemporaryFile())
    spec_f.write(json.dumps(spec).encode())
    spec_f.seek(0)
    err_f = stack.enter_context(tempfile.TemporaryFile())
    argv, passed, status_r = _command(cfg, python, strong=strong, channel_w=channel_w,
                                      io_bytes=io_bytes)
    procs_files = group.procs_files if group is not None else []
    try:
        proc = subprocess.Popen(
            [*join_cgroups_prefix(procs_files), *argv], stdin=spec_f, stdout=subprocess.DEVNULL,
            stderr=err_f, pass_fds=passed, env=_environment(),
            cwd="/" if strong else spec["workdir"], start_new_session=True)
    finally:
        for fd in passed:
            os.close(fd)
    return proc, status_r, err_f


def _collect(watch: Watch, cases: Sequence[Case], cfg: SandboxConfig, deadline: float,
             keep_going: Callable[[int, RunResult], bool] | None) -> tuple[list[RunResult], bool]:
    """The cases' results as they come, until the last, a stop, or the deadline."""
    results: list[RunResult] = []

    def on_report(report: dict[str, Any]) -> bool:
        results.append(_result(report, steps=cases[len(results)].steps is not None))
        return keep_going is None or keep_going(len(results) - 1, results[-1])

    timed_out = watch.collect(deadline, on_report, max_reports=len(cases),
                              line_cap=16 * cfg.max_output_bytes + (1 << 20))
    if timed_out and len(results) < len(cases):  # the case that was running
        results.append(RunResult(returncode=None, stdout="", stderr="", timed_out=True,
                                 seconds=0.0, killed_by="wall"))
    return results, timed_out


def _result(report: dict[str, Any], *, steps: bool) -> RunResult:
    """A case report from the harness (untrusted: malformed fields make a failed run)."""
    try:
        returncode = os.waitstatus_to_exitcode(int(report["status"]))
        stdout, stderr = str(report["stdout"]), str(report["stderr"])
        seconds = float(report["seconds"])
    except (KeyError, TypeError, ValueError):
        return RunResult(returncode=None, stdout="", stderr="", timed_out=False, seconds=0.0,
                         killed_by="garbled report")
    killed_by = None
    if returncode < 0:
        with contextlib.suppress(ValueError):
            killed_by = signal.Signals(-returncode).name
    values = decode_values(report.get("values")) if steps else None
    return RunResult(returncode=returncode, stdout=stdout, stderr=stderr, timed_out=False,
                     seconds=seconds, killed_by=killed_by, values=values)


def _spec(program: str, cases: Sequence[Case], cfg: SandboxConfig, *, workdir: str, python: str,
          channel_fd: int, strong: bool, nproc_limit: bool) -> dict[str, Any]:
    """What the harness needs, as JSON-able values (no expected value is ever among them)."""
    cpu = math.ceil(cfg.cpu_seconds)
    limits = {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (cfg.memory_mb << 20,) * 2,
              "RLIMIT_FSIZE": (cfg.file_size_mb << 20,) * 2,
              "RLIMIT_NOFILE": (cfg.open_files,) * 2, "RLIMIT_CORE": (0, 0)}
    if nproc_limit:  # no pids cgroup; in the sandbox's user namespace this counts per sample
        limits["RLIMIT_NPROC"] = (cfg.max_processes + _OWN_PROCESSES,) * 2
    return {
        "program": program, "workdir": workdir, "io_dir": IO_DIR if strong else workdir,
        "channel_fd": channel_fd,
        "cases": [{"stdin": c.stdin, "steps": None if c.steps is None else list(c.steps)}
                  for c in cases],
        "pythons": [python] if strong else [python, *_FALLBACK_PYTHONS],
        "drop_to": (SANDBOX_UID, SANDBOX_GID) if _as_root() else None,
        "pid_namespace": strong, "limits": limits, "max_output_bytes": cfg.max_output_bytes,
        "runner": RUNNER_SOURCE,
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "HOME": workdir, "TMPDIR": workdir},
    }


def _io_bytes(cases: Sequence[Case], cfg: SandboxConfig) -> int:
    """Room for every case's stdin and steps, and its outputs up to the file-size limit."""
    inputs = sum(len(c.stdin.encode("utf-8", "replace")) + len(json.dumps(c.steps)) for c in cases)
    return inputs + 3 * len(cases) * (cfg.file_size_mb << 20) + (1 << 20)


def _command(cfg: SandboxConfig, python: str, *, strong: bool, channel_w: int,
             io_bytes: int) -> tuple[list[str], list[int], int | None]:
    """(argv, fds to pass, read end of bubblewrap's status pipe or None)."""
    harness = [python, "-I", "-S", "-c", HARNESS_SOURCE]
    if not strong:
        return harness, [channel_w], None
    status_r, status_w = os.pipe()
    seccomp_r, seccomp_w = os.pipe()
    with os.fdopen(seccomp_w, "wb") as f:  # a few hundred bytes: fits in the pipe buffer
        f.write(seccomp_filter())
    args = bwrap_args(cfg.bwrap, runtime(cfg.python), as_root=_as_root(),
                      disk_bytes=cfg.disk_mb << 20, io_bytes=io_bytes, seccomp_fd=seccomp_r,
                      status_fd=status_w)
    return [*args, "--", *harness], [channel_w, status_w, seccomp_r], status_r


def _environment() -> dict[str, str]:
    # bubblewrap hands its environment to the harness, whose /proc/<pid>/environ a program of
    # the same uid can read: none of the trainer's variables (tokens, keys) go in.
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
