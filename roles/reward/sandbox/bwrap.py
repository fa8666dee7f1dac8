"""The bubblewrap command line of a sandbox, and the minimal runtime it shows.

The sandbox's filesystem is a fresh read-only root holding only:

* the interpreter, its standard library (site-packages hidden under an empty read-only tmpfs)
  and the shared libraries they load (found with ``ldd``), each bound read-only at its own path,
  plus ``/etc/ld.so.cache`` so that the loader resolves them as on the host;
* a new ``/proc`` (this PID namespace only) and a minimal ``/dev`` (null, zero, full, random,
  urandom, tty), then remounted read-only;
* ``/sandbox``, the sample's workdir: a tmpfs of ``disk_mb``, the only writable place besides
  ``/io``, the harness's tmpfs for each case's stdin and outputs (sized for them, so a program
  that fills its workdir still has its output recorded). Both exist only in the sandbox's mount
  namespace, so they are gone when the last process of the sample is: nothing is ever left on
  the host to clean up, whatever the program wrote there.

Namespaces: mount, PID, network (only a loopback of its own), IPC, UTS, cgroup; as non-root also
a user namespace mapping uid/gid 65534 to the caller (``--disable-userns``: no nested ones). As
root there is no user namespace (bubblewrap would map the program to host root); instead the
harness keeps only CAP_SETUID/CAP_SETGID/CAP_SETPCAP and drops itself to 65534:65534 on the host,
with every capability set emptied, before any program runs. ``--die-with-parent`` ties the
sandbox to the scoring process (to the thread that started it, so start sandboxes from a thread
that outlives them); ``--new-session`` detaches it from any terminal; the seccomp filter is
roles/reward/sandbox/seccomp.py.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

WORKDIR = "/sandbox"
IO_DIR = "/io"
"""The harness's tmpfs for each case's stdin, stdout, stderr and values."""
SANDBOX_UID = SANDBOX_GID = 65534
"""The program's uid/gid: host ``nobody`` as root, mapped to the caller in a user namespace."""

_LDD_PATH = re.compile(r"(?:=>\s+|^\s*)(/\S+)\s+\(0x", re.MULTILINE)
_INFO_SOURCE = ("import json, sys, sysconfig; print(json.dumps({'paths': sysconfig.get_paths(), "
                "'dynload': sysconfig.get_config_var('DESTSHARED')}))")


class SandboxUnavailable(RuntimeError):
    """The strong sandbox cannot run here; the message names the missing piece."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the sandbox shows of the host: an interpreter and what it needs."""

    python: str
    """The interpreter's real path (symlinks resolved, so no virtualenv applies)."""
    binds: tuple[tuple[str, str], ...]
    """(host source, sandbox path) pairs, bound read-only."""
    hidden: tuple[str, ...]
    """Directories inside the binds covered by an empty read-only tmpfs (site-packages)."""


@functools.cache
def runtime(python: str) -> Runtime:
    """The minimal runtime for ``python`` (a path or a name on PATH); SandboxUnavailable if not."""
    found = shutil.which(python)
    if found is None:
        raise SandboxUnavailable(f"interpreter {python!r} not found")
    exe = os.path.realpath(found)
    try:
        info = json.loads(subprocess.run([exe, "-I", "-S", "-c", _INFO_SOURCE], check=True,
                                         capture_output=True, timeout=60).stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise SandboxUnavailable(f"cannot query interpreter {exe}: {e}") from e
    paths = info["paths"]
    dirs = _outermost({os.path.realpath(p) for p in
                       (paths["stdlib"], paths["platstdlib"], info["dynload"]) if p})
    hidden = tuple(sorted(p for p in {os.path.realpath(paths[k]) for k in ("purelib", "platlib")}
                          if os.path.isdir(p) and any(_inside(p, d) for d in dirs)))
    binds = [(exe, exe), *((d, d) for d in dirs)]
    binds += [(os.path.realpath(lib), lib) for lib in _shared_libraries(exe, info["dynload"])]
    if os.path.exists("/etc/ld.so.cache"):
        binds.append(("/etc/ld.so.cache", "/etc/ld.so.cache"))
    return Runtime(python=exe, binds=tuple(dict.fromkeys(binds)), hidden=hidden)


def _shared_libraries(exe: str, dynload: str | None) -> list[str]:
    """Every library the interpreter and its extension modules load, as the loader names them."""
    ldd = shutil.which("ldd", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if ldd is None:
        raise SandboxUnavailable("ldd not found: cannot list the interpreter's shared libraries")
    # _tkinter needs a display the sandbox never has; its ~17 X11/Tk libraries would cost a
    # bind mount each on every sample.
    modules = [m for m in glob.glob(os.path.join(dynload or "", "*.so"))
               if not os.path.basename(m).startswith("_tkinter")]
    files = [exe, *sorted(modules)]
    out = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60, check=False)
    return sorted(set(_LDD_PATH.findall(out.stdout)))


def _parents(paths: Iterable[str]) -> list[str]:
    """Every ancestor directory of ``paths`` but /, parents before children."""
    found = {str(p) for path in paths for p in PurePosixPath(path).parents if str(p) != "/"}
    return sorted(found, key=lambda p: (p.count("/"), p))


def _outermost(dirs: set[str]) -> list[str]:
    return sorted(d for d in dirs if not any(d != o and _inside(d, o) for o in dirs))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def bwrap_args(bwrap: str, rt: Runtime, *, as_root: bool, disk_bytes: int, io_bytes: int,
               seccomp_fd: int, status_fd: int) -> list[str]:
    """bubblewrap's options up to (not including) ``--`` and the command."""
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid",
            "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if as_root:  # see the module docstring: the harness drops to 65534 itself
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_SETPCAP"]
    else:
        args += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
                 "--gid", str(SANDBOX_GID)]
    # bubblewrap 0.8 makes the missing parents of a bind's destination 0700 (an uninitialised
    # mode), which uid 65534 could not traverse as root: make them 0755 first.
    for parent in _parents(dest for _, dest in rt.binds):
        args += ["--dir", parent]
    for source, dest in rt.binds:
        args += ["--ro-bind", source, dest]
    for path in rt.hidden:
        args += ["--tmpfs", path, "--remount-ro", path]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--perms", "1777", "--size", str(disk_bytes), "--tmpfs", WORKDIR,
             "--perms", "1777", "--size", str(io_bytes), "--tmpfs", IO_DIR,
             "--chdir", WORKDIR, "--remount-ro", "/",
             "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd)]
    return args


def join_cgroups_prefix(procs_files: list[str]) -> list[str]:
    """argv prefix: a shell that writes its pid into each ``cgroup.procs``, then execs the rest,
    so bubblewrap and everything it starts are in the sample's cgroups from their first
    instruction (moving a running process would leave its earlier children outside)."""
    if not procs_files:
        return []
    script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *procs_files, "--"]
