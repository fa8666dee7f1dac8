"""Watching one running sample: its reports under the wall-clock limit, and its end.

The sample's processes: bubblewrap (our child, its own session), bubblewrap's PID-1 reaper in
the sandbox's PID namespace, the harness, the program. Ending a sample kills the reaper through a
pidfd (the kernel then kills everything in the PID namespace, and the mount namespace with the
workdir tmpfs goes with it) and bubblewrap's session, and waits until the reaper has exited: by
then nothing of the sample runs. In the weak mode there is no PID namespace; the harness and the
program's last process group are killed instead. Either way the sample's cgroup, when there is
one, is emptied and removed afterwards (roles/reward/sandbox/cgroup.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


class Watch:
    """Reads the harness's channel and bubblewrap's status pipe; kills the sample at the end."""

    def __init__(self, proc: subprocess.Popen, channel_fd: int, status_fd: int | None) -> None:
        self.proc = proc
        self.ready = False
        """The harness started (after this, a dying harness is the program's doing)."""
        self._buffers: dict[int, bytearray] = {channel_fd: bytearray()}
        self._channel = channel_fd
        self._status = status_fd
        if status_fd is not None:
            self._buffers[status_fd] = bytearray()
        self._reaper: int | None = None  # pidfd of bubblewrap's PID 1
        self._last_group: int | None = None  # weak mode: the program's process group
        self._ended = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def collect(self, deadline: float, on_report: Callable[[dict[str, Any]], bool], *,
                max_reports: int, line_cap: int) -> bool:
        """Pass each case report to ``on_report`` until the channel closes, ``on_report`` says
        stop, or ``deadline`` (monotonic) passes; True if the deadline ended it."""
        reports = 0
        while self._channel in self._buffers:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return True
            ready, _, _ = select.select(list(self._buffers), [], [], timeout)
            for fd in ready:
                for line in self._read_lines(fd, line_cap):
                    message = _parse(line)
                    if fd == self._status:
                        self._on_status(message)
                    elif message is None or "status" not in message:
                        if not self._on_control(message):
                            return False  # garbage on the channel: the sample is over
                    elif reports < max_reports:
                        reports += 1
                        if not on_report(message):
                            return False
        return False

    def end(self) -> None:
        """Kill whatever of the sample still runs and wait until it is gone. Idempotent."""
        if self._ended:
            return
        self._ended = True
        if self._last_group is not None:  # weak mode, before the harness that pins its pid
            _quietly(os.killpg, self._last_group, signal.SIGKILL)
        if self._reaper is not None:
            _quietly(signal.pidfd_send_signal, self._reaper, signal.SIGKILL)
        # bubblewrap exits by itself once its reaper has: it reaps it. Killed first, it would
        # leave the reaper's zombie to the host's init, which may be slow to collect it.
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            _quietly(os.killpg, self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._reaper is not None:
            # Readable once the reaper has exited, i.e. after the kernel has killed and reaped
            # everything in its PID namespace.
            select.select([self._reaper], [], [], 10.0)
            os.close(self._reaper)
        if self._status is not None:
            os.close(self._status)

    def _read_lines(self, fd: int, line_cap: int) -> list[bytes]:
        chunk = os.read(fd, 1 << 20)
        buffer = self._buffers[fd]
        if not chunk:
            del self._buffers[fd]
            return []
        buffer += chunk
        *parts, rest = buffer.split(b"\n")
        lines = [bytes(p) for p in parts]
        if len(rest) > line_cap:  # an endless line: treat as garbage
            lines.append(b"")
            rest = bytearray()
        self._buffers[fd] = bytearray(rest)
        return lines

    def _on_status(self, message: dict[str, Any] | None) -> None:
        if message and "child-pid" in message and self._reaper is None:
            self._reaper = _child_pidfd(int(message["child-pid"]), parent=self.proc.pid)

    def _on_control(self, message: dict[str, Any] | None) -> bool:
        """"ready" and "started" messages; False for anything else."""
        if message is not None and message.get("ready") is True:
            self.ready = True
            return True
        if message is not None and type(message.get("started")) is int:
            if self._status is None:  # weak mode: host pids
                self._last_group = message["started"]
            return True
        return False


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return message if type(message) is dict else None


def _child_pidfd(pid: int, *, parent: int) -> int | None:
    """A pidfd for ``pid`` if it is still ``parent``'s child (checked after opening, so the
    pidfd cannot refer to a reused pid), else None (it has exited already)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != parent:
        os.close(fd)
        return None
    return fd


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        fn(*args)
