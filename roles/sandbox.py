"""Run untrusted Python programs in a throwaway sandbox, and the ``code`` reward scorer.

:func:`run_python` runs one program in a fresh process and returns what it printed. Each run:

* gets its own temporary directory as cwd (removed afterwards, also on timeout), inside a
  root-owned ``0711`` directory so that other sandboxes cannot list it;
* gets an empty environment (``PATH``, ``LANG``/``LC_ALL=C.UTF-8``, ``HOME``/``TMPDIR`` = its
  directory) and runs ``python -I -X utf8``: isolated mode ignores ``PYTHON*`` variables, the user
  site and the script's directory. ``site`` still runs (no ``-S``) because programs call
  ``exit()``, which ``site`` defines;
* has limits on CPU time, address space, file size, processes (per uid), open files, and no core
  dumps (``setrlimit``), and is killed with its whole process group after ``wall_seconds``.

How much more it gets depends on what the machine allows; :func:`isolation` probes once:

* **As root with CAP_SYS_ADMIN** (this project's CI): new network, PID and mount namespaces
  (util-linux ``unshare``). The network namespace has only a loopback device, which is down, so
  no address is reachable, not even the host's 127.0.0.1. In the mount namespace every mount is
  read-only except the run's directory, and ``/proc`` shows only the sandbox's processes. When
  the program exits or is killed, the kernel kills everything left in its PID namespace, so
  nothing it forked (even after ``setsid``) outlives the run. The program runs as
  ``nobody:nogroup`` (65534) with no supplementary groups and ``no_new_privs``: it cannot read
  root's ``0600`` files or signal processes of other users.
* **As another user**: the same namespaces inside a new user namespace when unprivileged user
  namespaces are allowed; the program keeps the caller's uid, so it can read whatever the caller
  can read (file isolation is weaker).
* **Without namespaces** (e.g. a container without CAP_SYS_ADMIN): an audit hook in the
  program's interpreter refuses sockets, subprocesses, ``ctypes`` and writes outside its
  directory. That stops ordinary programs, not a determined attacker: prefer a machine where the
  namespaces work. Processes that leave the process group (``setsid``) survive the group kill.

Setup runs in a small launcher (``python -I -S``, the functions ``_launcher_*`` below, sent as
source) instead of a ``preexec_fn``, which is unsafe when the caller has threads. The launcher
makes the mounts read-only, forks the program with its limits and identity, reaps it, and reports
its wait status on a pipe, so the parent gets the program's exit status, not the launcher's.
If the configured interpreter is not executable by the sandbox user (a virtualenv under
``/root``), the launcher falls back to ``/usr/bin/python3`` and the parent logs a warning once.

The ``code`` scorer (roles/code_scorer.py) runs model-written programs through ``run_python``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import json
import logging
import math
import os
import re
import resource
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

SANDBOX_UID = 65534
"""uid the program runs as when the caller is root (``nobody``)."""
SANDBOX_GID = 65534
"""gid the program runs as when the caller is root (``nogroup``)."""
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
"""Interpreters tried in order when ``SandboxConfig.python`` is not executable by the sandbox."""
PROGRAM_NAME = "main.py"

# New network, PID and mount namespaces; --fork makes the launcher PID 1 of the PID namespace and
# --kill-child kills it (and with it the namespace) if the unshare process is killed.
_NAMESPACES = ("--net", "--pid", "--mount", "--fork", "--kill-child")
# Without root: the same inside a user namespace that maps only the caller's own uid; --keep-caps
# keeps the namespace's capabilities (ambient) across exec so that the launcher can mount, and
# the launcher clears them before it execs the program.
_USER_NAMESPACES = ("--user", "--map-current-user", "--keep-caps", *_NAMESPACES)


@dataclass(kw_only=True, slots=True)
class SandboxConfig:
    cpu_seconds: float = 5.0
    """CPU seconds per process (RLIMIT_CPU, rounded up): SIGXCPU, then SIGKILL 1 s later."""
    wall_seconds: float = 10.0
    """Wall-clock limit from start; the whole process group is then killed."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS); allocations beyond it fail (MemoryError)."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), stdout and stderr included."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes of the sandbox uid, counted across all sandboxes running at once."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 1_000_000
    """stdout and stderr are each cut to this many bytes."""
    python: str = sys.executable
    """Interpreter for the program; see the module docstring for the fallback."""

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "file_size_mb", "max_processes",
                     "open_files", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class RunResult:
    returncode: int | None
    """Exit code; -N when killed by signal N; None when killed at the wall limit."""
    stdout: str
    """Captured stdout (UTF-8, undecodable bytes replaced), at most max_output_bytes bytes."""
    stderr: str
    """Captured stderr, like stdout."""
    timed_out: bool
    """Killed at the wall-clock limit."""
    seconds: float
    """Wall-clock seconds from start to exit or kill."""
    killed_by: str | None
    """What ended it: "wall" for the wall limit, else the signal's name (SIGXCPU: the CPU limit;
    SIGKILL: the CPU hard limit or the kernel); None when the program exited by itself."""


@dataclass(frozen=True, slots=True)
class Isolation:
    """What this machine lets the sandbox use (see the module docstring)."""

    unshare: tuple[str, ...]
    """argv prefix creating the namespaces; () when none can be created."""
    drop_to: tuple[int, int] | None
    """(uid, gid) the program runs as; None keeps the caller's."""

    @property
    def namespaces(self) -> bool:
        return bool(self.unshare)


@functools.cache
def isolation() -> Isolation:
    """Probe once per process which namespaces work here (a few ms)."""
    root = os.geteuid() == 0
    drop_to = (SANDBOX_UID, SANDBOX_GID) if root else None
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is not None:
        prefix = (unshare, *(_NAMESPACES if root else _USER_NAMESPACES), "--")
        try:
            probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=30, check=False)
            if probe.returncode == 0:
                return Isolation(unshare=prefix, drop_to=drop_to)
            reason = probe.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = repr(e)
    else:
        reason = "no unshare command"
    logger.warning("sandbox: namespaces unavailable (%s); network and file writes are only "
                   "blocked by an in-interpreter audit hook", reason)
    return Isolation(unshare=(), drop_to=drop_to)


# --------------------------------------------------------------------------- run_python


def run_python(code: str, *, stdin: str = "", cfg: SandboxConfig = SandboxConfig()) -> RunResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox with ``stdin`` as its input.

    Never raises for anything the program does (crash, timeout, output flood, escape attempts);
    raises RuntimeError when the sandbox itself cannot be set up (no usable interpreter, mounts
    failing), which is a problem of the machine, not of the program.
    """
    iso = isolation()
    with contextlib.ExitStack() as stack:
        outer = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rolegraph-sandbox-", ignore_cleanup_errors=True))
        workdir = _make_workdir(outer, code, iso.drop_to)
        stdin_f, stdout_f, stderr_f = (
            stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        stdin_f.write(stdin.encode("utf-8", "replace"))
        stdin_f.seek(0)
        status_r, status_w = os.pipe()
        stack.callback(os.close, status_r)
        env = _environment(workdir)
        spec = _launcher_spec(cfg, iso, workdir, env, status_w)
        argv = [*iso.unshare, sys.executable, "-I", "-S", "-c", _LAUNCHER_SOURCE, json.dumps(spec)]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=stdin_f, stdout=stdout_f, stderr=stderr_f,
                                    cwd=workdir, env=env, pass_fds=(status_w,),
                                    start_new_session=True)
        finally:
            os.close(status_w)  # the launcher holds the only write end: EOF once it is gone
        try:
            timed_out = not _wait_exited(proc.pid, cfg.wall_seconds)
        finally:
            _kill_group(proc.pid)  # before reaping the leader, so the group id cannot be reused
            proc.wait()
        seconds = time.monotonic() - start
        report = _read_report(status_r)
        if "error" in report:
            raise RuntimeError(f"sandbox setup failed: {report['error']}")
        _warn_if_substituted(cfg.python, report.get("python"))
        returncode = None if timed_out else _returncode(report, proc.returncode)
        result = RunResult(
            returncode=returncode,
            stdout=_read_capped(stdout_f, cfg.max_output_bytes),
            stderr=_read_capped(stderr_f, cfg.max_output_bytes),
            timed_out=timed_out,
            seconds=seconds,
            killed_by=_killed_by(returncode, timed_out),
        )
    return result


def _make_workdir(outer: str, code: str, drop_to: tuple[int, int] | None) -> str:
    """A fresh directory holding the program, owned by the sandbox uid, inside ``outer``."""
    os.chmod(outer, 0o711)  # traversable but not listable: other sandboxes cannot find workdir
    workdir = os.path.realpath(tempfile.mkdtemp(dir=outer))  # realpath: matched in mountinfo
    Path(workdir, PROGRAM_NAME).write_bytes(code.encode("utf-8", "replace"))
    if drop_to is not None:
        os.chown(workdir, *drop_to)
    return workdir


def _environment(workdir: str) -> dict[str, str]:
    # TMPDIR: /tmp is read-only in the mount namespace, and tempfile should not have to find out.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": workdir, "TMPDIR": workdir}


def _launcher_spec(cfg: SandboxConfig, iso: Isolation, workdir: str, env: dict[str, str],
                   status_fd: int) -> dict[str, Any]:
    """What the launcher needs, as JSON-able values."""
    cpu = math.ceil(cfg.cpu_seconds)
    limits = {
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        "RLIMIT_AS": (cfg.memory_mb << 20,) * 2,
        "RLIMIT_FSIZE": (cfg.file_size_mb << 20,) * 2,
        "RLIMIT_NPROC": (cfg.max_processes,) * 2,
        "RLIMIT_NOFILE": (cfg.open_files,) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    args = ["-I", "-X", "utf8"]
    args += [PROGRAM_NAME] if iso.namespaces else ["-c", _GUARD_SOURCE]
    return {
        "workdir": workdir,
        "isolate_fs": iso.namespaces,
        "drop_to": iso.drop_to,
        "pythons": [cfg.python, *FALLBACK_PYTHONS],
        "args": args,
        "env": env,
        "limits": limits,
        "status_fd": status_fd,
    }


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit without reaping it; False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # kernel < 5.3: poll instead
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_report(fd: int) -> dict[str, Any]:
    """The launcher's JSON lines, merged: python (the interpreter used), wait_status or error."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    report: dict[str, Any] = {}
    for line in b"".join(chunks).splitlines():
        report.update(json.loads(line))
    return report


@functools.cache  # once per (wanted, used) pair
def _warn_if_substituted(wanted: str, used: str | None) -> None:
    if used is not None and used != wanted:
        logger.warning("sandbox: %s is not executable by the sandbox user; programs run with %s",
                       wanted, used)


def _returncode(report: dict[str, Any], launcher_rc: int) -> int:
    if "wait_status" in report:
        return os.waitstatus_to_exitcode(report["wait_status"])
    return launcher_rc  # the launcher itself died (e.g. the kernel's OOM killer)


def _killed_by(returncode: int | None, timed_out: bool) -> str | None:
    if timed_out:
        return "wall"
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _read_capped(f: Any, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", "replace")


# --------------------------------------------------------------------------- launcher
# The functions below run in the launcher process (``python -I -S -c``), not in this one: their
# source is sent along, so they use only the modules that _LAUNCHER_SOURCE imports and no other
# globals of this module. Keep them valid on older Python versions than the caller's.

def _launcher_main(spec_json):
    """Isolate the filesystem, fork the program, reap everything, report the program's status."""
    spec = json.loads(spec_json)
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not be able to forge a report
    try:
        if spec["isolate_fs"]:
            _launcher_isolate_fs(spec["workdir"])
    except Exception as e:
        error = {"error": "isolating the filesystem: %r" % e}
        os.write(status_fd, json.dumps(error).encode() + b"\n")
        sys.exit(1)
    pid = os.fork()
    if pid == 0:
        _launcher_exec_program(spec, status_fd)
    # As PID 1 of the namespace the launcher inherits orphans: reap them too, so they do not pile
    # up as zombies counted against RLIMIT_NPROC. Whatever is left dies with the namespace.
    while True:
        reaped, status = os.wait()
        if reaped == pid:
            break
    os.write(status_fd, json.dumps({"wait_status": status}).encode() + b"\n")


def _launcher_isolate_fs(workdir):
    """Make every mount read-only except ``workdir``; show only this PID namespace in /proc."""
    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly, ms_remount, ms_bind = 1, 32, 4096
    kept = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21}

    def mount(source, target, fstype, flags):
        args = [None if s is None else s.encode() for s in (source, target, fstype)]
        if libc.mount(args[0], args[1], args[2], flags, None) != 0:
            raise OSError(ctypes.get_errno(), "mount %s" % target)

    with contextlib.suppress(OSError):  # a fresh /proc is a nicety; the old one leaks only pids
        mount("proc", "/proc", "proc", kept["nosuid"] | kept["nodev"] | kept["noexec"])
    mount(workdir, workdir, None, ms_bind)  # its own mount, so it stays writable
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if target == workdir or "ro" in options:
            continue
        flags = ms_remount | ms_bind | ms_rdonly
        flags |= sum(flag for name, flag in kept.items() if name in options)
        mount(None, target, None, flags)
    os.chdir(workdir)  # the inherited cwd still points into the old, now read-only, mount


def _launcher_exec_program(spec, status_fd):
    """In the forked child: drop privileges, set limits, exec the interpreter. Never returns."""
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
            signal.signal(sig, signal.SIG_DFL)
        libc = ctypes.CDLL(None, use_errno=True)
        # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing; PR_CAP_AMBIENT_CLEAR_ALL: no
        # capabilities survive the exec (the ambient ones --keep-caps gave the launcher)
        for option, args in ((38, (1, 0, 0, 0)), (47, (4, 0, 0, 0))):
            if libc.prctl(option, *args) != 0:
                raise OSError(ctypes.get_errno(), "prctl(%d)" % option)
        if spec["drop_to"] is not None:
            uid, gid = spec["drop_to"]
            os.setgroups([])
            os.setgid(gid)  # as root these set the real, effective and saved ids
            os.setuid(uid)
        pythons = [p for p in spec["pythons"] if p and os.access(p, os.X_OK)]  # as the new uid
        if not pythons:
            raise OSError("no interpreter executable by uid %d among %s"
                          % (os.getuid(), spec["pythons"]))
        for name, limit in spec["limits"].items():
            resource.setrlimit(getattr(resource, name), tuple(limit))
        os.write(status_fd, json.dumps({"python": pythons[0]}).encode() + b"\n")
    except BaseException as e:
        os.write(status_fd, json.dumps({"error": repr(e)}).encode() + b"\n")
        os._exit(127)
    try:
        os.execve(pythons[0], [pythons[0], *spec["args"]], spec["env"])
    except BaseException as e:  # e.g. EAGAIN: another sandbox holds all of the uid's processes
        os.write(2, ("sandbox: cannot exec %s: %r\n" % (pythons[0], e)).encode())
    os._exit(127)


def _guard_main():
    """Without namespaces: refuse network, subprocesses, ctypes and writes outside the cwd
    through an audit hook, then run main.py. Runs in the program's own interpreter."""
    root = os.path.realpath(os.getcwd()) + os.sep
    refused = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn",
               "os.system", "os.startfile")
    # event -> positions of its arguments naming a path it modifies
    modifying = {"os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,),
                 "os.link": (1,), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
                 "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        if isinstance(path, int) or path is None:
            return True  # an already open descriptor
        return (os.path.realpath(os.fsdecode(path)) + os.sep).startswith(root)

    def hook(event, args):
        if event.startswith(refused):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and not inside(path):
                raise PermissionError("sandbox: writing %r is not allowed" % (path,))
        elif event in modifying and not all(inside(args[i]) for i in modifying[event]):
            raise PermissionError("sandbox: %s outside the working directory" % event)

    sys.addaudithook(hook)
    sys.argv = [PROGRAM_NAME]
    runpy.run_path(PROGRAM_NAME, run_name="__main__")


def _source(*functions: Any, imports: str, call: str,
            constants: dict[str, Any] | None = None) -> str:
    """Stand-alone ``-c`` source: the imports, the constants, the functions, then the call."""
    parts = ["from __future__ import annotations", f"import {imports}"]
    parts += [f"{name} = {value!r}" for name, value in (constants or {}).items()]
    parts += [textwrap.dedent(inspect.getsource(fn)) for fn in functions]
    return "\n".join([*parts, call, ""])


_LAUNCHER_SOURCE = _source(
    _launcher_main, _launcher_isolate_fs, _launcher_exec_program,
    imports="contextlib, ctypes, json, os, re, resource, signal, sys",
    call="_launcher_main(sys.argv[1])")
_GUARD_SOURCE = _source(
    _guard_main, imports="os, runpy, sys", constants={"PROGRAM_NAME": PROGRAM_NAME},
    call="_guard_main()")
