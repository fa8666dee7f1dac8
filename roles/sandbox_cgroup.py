"""Per-sample memory and process limits for the sandbox, through the memory and pids cgroups.

Each sample gets its own cgroup (v1: one in the memory and one in the pids hierarchy; v2: one
with both controllers), created before its sandbox starts; the sandbox's first process joins it
before it execs bubblewrap, so every process of the sample is inside. The limits then hold for
the whole process tree: anonymous memory, memfd and tmpfs pages and kernel memory (inodes) count
against ``memory_mb`` (swap too: ``memsw`` / ``memory.swap.max`` = 0 extra), and ``pids.max``
counts the sample's processes and threads, not the uid's. Past the memory limit the kernel's OOM
killer kills inside the cgroup only.

Names are ``<owner pid>.<owner start time>.<n>`` under ``rolegraph-sandbox/``, so a cgroup whose
owner died (a scoring worker killed by the pool) is recognised and removed by
:func:`remove_orphans`.

Where the controllers cannot be used (not root, read-only cgroupfs, v2 without the controllers
delegated), :func:`cgroups` returns None and says why once in the log; the sandbox then limits
memory per process only (RLIMIT_AS, RLIMIT_FSIZE per file, the tmpfs size) and processes through
RLIMIT_NPROC inside the sample's own user namespace (see roles/sandbox.py).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

GROUP = "rolegraph-sandbox"
"""Directory, in each hierarchy, that holds the per-sample cgroups."""
_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where per-sample cgroups are made: one parent directory per hierarchy."""

    version: int
    """1 (memory and pids hierarchies) or 2 (unified)."""
    memory_parent: Path
    pids_parent: Path


@dataclass(slots=True)
class SampleCgroup:
    """The cgroup(s) of one sample: create, join (via :attr:`procs_files`), kill, remove."""

    hierarchy: Cgroups
    name: str
    dirs: list[Path] = field(default_factory=list)

    @property
    def procs_files(self) -> list[str]:
        """``cgroup.procs`` files a process writes its pid into to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def stats(self) -> dict[str, float]:
        """Peak memory (MB), OOM kills and refused forks so far."""
        h, mem = self.hierarchy, self.dirs[0]
        pids = self.dirs[-1]
        if h.version == 1:
            peak = _read_int(mem / "memory.max_usage_in_bytes")
            oom = _read_keyed(mem / "memory.oom_control").get("oom_kill", 0)
        else:
            peak = _read_int(mem / "memory.peak")
            oom = _read_keyed(mem / "memory.events").get("oom_kill", 0)
        return {"memory_peak_mb": peak / 2**20, "oom_kills": float(oom),
                "forks_refused": float(_read_keyed(pids / "pids.events").get("max", 0))}

    def kill(self) -> None:
        """SIGKILL every process in the sample's cgroup(s), until none is left (≤ 5 s)."""
        if self.hierarchy.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 5.0
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return found

    def remove(self) -> None:
        """Kill what is left, then remove the directories (retrying while the kernel reaps)."""
        self.kill()
        for d in self.dirs:
            _rmdir_retrying(d)
        self.dirs.clear()


def create(hierarchy: Cgroups, *, memory_bytes: int, max_processes: int) -> SampleCgroup:
    """A fresh cgroup (pair) with these limits; OSError if the kernel refuses."""
    group = SampleCgroup(hierarchy=hierarchy, name=f"{_owner_tag(os.getpid())}.{next(_counter)}")
    try:
        if hierarchy.version == 1:
            mem = _mkdir(group, hierarchy.memory_parent / group.name)
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            _write_if_exists(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no swap
            pids = _mkdir(group, hierarchy.pids_parent / group.name)
        else:
            mem = pids = _mkdir(group, hierarchy.memory_parent / group.name)
            (mem / "memory.max").write_text(str(memory_bytes))
            _write_if_exists(mem / "memory.swap.max", "0")
        (pids / "pids.max").write_text(str(max_processes))
    except OSError:
        group.remove()
        raise
    return group


@functools.cache
def cgroups() -> Cgroups | None:
    """The usable hierarchy (probed once per process: a test cgroup is made and removed)."""
    try:
        hierarchy = _find()
        create(hierarchy, memory_bytes=64 << 20, max_processes=8).remove()
    except (OSError, LookupError) as e:
        logger.warning("sandbox: no per-sample cgroup limits (%s); memory is limited per process "
                       "(RLIMIT_AS) and processes per sample through RLIMIT_NPROC in the "
                       "sample's user namespace", e)
        return None
    logger.info("sandbox: per-sample memory and pids limits through cgroup v%d (%s)",
                hierarchy.version, hierarchy.memory_parent)
    return hierarchy


def remove_orphans(hierarchy: Cgroups | None = None, *, owner: int | None = None) -> int:
    """Kill and remove per-sample cgroups whose owning process is gone (or is ``owner``).

    Returns how many were removed. Called when the scoring pool kills a worker (whose
    sandboxes die with it, see ``--die-with-parent``, but whose cgroups would stay).
    """
    hierarchy = hierarchy or cgroups()
    if hierarchy is None:
        return 0
    names = {d.name for parent in {hierarchy.memory_parent, hierarchy.pids_parent}
             if parent.is_dir() for d in parent.iterdir() if d.is_dir()}
    removed = 0
    for name in sorted(names):
        pid_text, start, _ = (name.split(".") + ["", "", ""])[:3]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != owner and _owner_tag(pid) == f"{pid}.{start}":
            continue  # its owner is alive: the sandbox is still in use
        group = SampleCgroup(hierarchy=hierarchy, name=name, dirs=[
            d for d in {hierarchy.memory_parent / name, hierarchy.pids_parent / name}
            if d.is_dir()])
        group.remove()
        removed += 1
    return removed


def _find() -> Cgroups:
    """The v1 memory+pids mounts, else a v2 mount with both controllers; LookupError if none."""
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, target, fstype, options, *_ = line.split()
            if fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options.split(","):
                        mounts[controller] = Path(target)
            elif fstype == "cgroup2":
                mounts.setdefault("unified", Path(target))
    if "memory" in mounts and "pids" in mounts:
        mem = _ensure_parent(mounts["memory"] / GROUP)
        return Cgroups(version=1, memory_parent=mem, pids_parent=_ensure_parent(
            mounts["pids"] / GROUP))
    if "unified" in mounts:
        return _find_v2(mounts["unified"])
    raise LookupError("no cgroup memory+pids controllers are mounted")


def _find_v2(root: Path) -> Cgroups:
    available = (root / "cgroup.controllers").read_text().split()
    if missing := {"memory", "pids"} - set(available):
        raise LookupError(f"cgroup2 at {root} lacks the {', '.join(sorted(missing))} "
                          f"controller(s) (bound to v1 or not enabled)")
    parent = _ensure_parent(root / GROUP)
    # The parent holds no process, so it may hand the controllers to its children.
    (root / "cgroup.subtree_control").write_text("+memory +pids")
    (parent / "cgroup.subtree_control").write_text("+memory +pids")
    return Cgroups(version=2, memory_parent=parent, pids_parent=parent)


def _ensure_parent(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def _mkdir(group: SampleCgroup, path: Path) -> Path:
    path.mkdir()
    group.dirs.append(path)
    return path


def _owner_tag(pid: int) -> str:
    """``pid.starttime``: names a process uniquely (pids are reused, start times are not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return f"{pid}.gone"
    return f"{pid}.{stat.rsplit(')', 1)[1].split()[19]}"  # field 22; comm may contain spaces


def _rmdir_retrying(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the last task is released
            if time.monotonic() >= deadline:
                logger.warning("sandbox: cgroup %s still busy after %.0f s; left for "
                               "remove_orphans", path, timeout)
                return
            time.sleep(0.005)


def _write_if_exists(path: Path, value: str) -> None:
    if path.exists():
        path.write_text(value)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _read_keyed(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in lines if len(line.split()) == 2)}
