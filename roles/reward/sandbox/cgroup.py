"""Per-sample memory and process limits for the sandbox, through the memory and pids cgroups.

Each sample gets its own cgroup (v1: one in the memory and one in the pids hierarchy; v2: one
with both controllers), created before its sandbox starts; the sandbox's first process joins it
before it execs bubblewrap, so every process of the sample is inside. The limits then hold for
the whole process tree: anonymous memory, memfd and tmpfs pages and kernel memory (inodes) count
against ``memory_mb`` (swap too: ``memsw`` / ``memory.swap.max`` = 0 extra), and ``pids.max``
counts the sample's processes and threads, not the uid's. Past the memory limit the kernel's OOM
killer kills inside the cgroup only.

They are made under the scoring process's own cgroup, so whatever limits the job already has
(a SLURM or Kubernetes memory limit) still hold, and a non-root user with a delegated cgroup
(chowned to it) gets the same limits as root. Layout: ``<own cgroup>/rolegraph-sandbox-<pid>.
<start time>/<n>``, one parent per scoring process, removed when it exits; the parent of a
process that died (a scoring worker killed by the pool) is recognised by its name and removed
by :func:`remove_orphans`.

Where the controllers cannot be used (not root and nothing delegated, read-only cgroupfs, v2
without the controllers available), :func:`cgroups` returns None and says why once in the log;
the sandbox then limits memory per process only (RLIMIT_AS, RLIMIT_FSIZE per file, the tmpfs
size) and processes through RLIMIT_NPROC inside the sample's own user namespace (see
roles/reward/sandbox/__init__.py).
"""
from __future__ import annotations

import atexit
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

PREFIX = "rolegraph-sandbox-"
"""Name prefix of each scoring process's parent directory of per-sample cgroups."""
_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where per-sample cgroups are made: one parent directory per hierarchy."""

    version: int
    """1 (memory and pids hierarchies) or 2 (unified)."""
    memory_parent: Path
    """This process's parent of per-sample cgroups (memory hierarchy; v2: the only one)."""
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
    group = SampleCgroup(hierarchy=hierarchy, name=str(next(_counter)))
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
                       "only (RLIMIT_AS) and processes per sample through RLIMIT_NPROC in the "
                       "sample's user namespace", e)
        return None
    atexit.register(_remove_parents, hierarchy)
    if removed := _remove_orphans(hierarchy, owner=None):  # left by processes killed earlier
        logger.info("sandbox: removed the cgroups of %d scoring processes that are gone", removed)
    logger.info("sandbox: per-sample memory and pids limits through cgroup v%d (%s)",
                hierarchy.version, hierarchy.memory_parent)
    return hierarchy


def remove_orphans(*, owner: int | None = None) -> int:
    """Kill and remove the per-sample cgroups of scoring processes that are gone (or of
    ``owner``, about to be). Returns how many parents were removed. The scoring pool calls it
    when it kills a worker: the worker's sandboxes die with it, its cgroups would stay."""
    hierarchy = cgroups()
    return 0 if hierarchy is None else _remove_orphans(hierarchy, owner=owner)


def _remove_orphans(hierarchy: Cgroups, *, owner: int | None) -> int:
    removed = set()
    for parent_dir in {hierarchy.memory_parent.parent, hierarchy.pids_parent.parent}:
        for d in parent_dir.glob(PREFIX + "*"):
            pid_text, _, start = d.name[len(PREFIX):].partition(".")
            if not pid_text.isdigit():
                continue
            if int(pid_text) != owner and _owner_tag(int(pid_text)) == f"{pid_text}.{start}":
                continue  # its owner is alive: in use
            _remove_parent(hierarchy, d)
            removed.add(d.name)
    return len(removed)


def _remove_parents(hierarchy: Cgroups) -> None:
    for d in {hierarchy.memory_parent, hierarchy.pids_parent}:
        _remove_parent(hierarchy, d)


def _remove_parent(hierarchy: Cgroups, parent: Path) -> None:
    for child in [c for c in parent.iterdir() if c.is_dir()] if parent.is_dir() else []:
        SampleCgroup(hierarchy=hierarchy, name=child.name, dirs=[child]).remove()
    _rmdir_retrying(parent)


def _find() -> Cgroups:
    """Parents under this process's own cgroup: v1 memory+pids, else v2; LookupError if none."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, target, fstype, options, *_ = line.split()
            if fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options.split(","):
                        mounts[controller] = Path(target)
            elif fstype == "cgroup2":
                mounts.setdefault("unified", Path(target))
    own = _own_cgroups()
    name = PREFIX + _owner_tag(os.getpid())
    if "memory" in mounts and "pids" in mounts:
        return Cgroups(version=1, memory_parent=_ensure_dir(mounts["memory"], own["memory"], name),
                       pids_parent=_ensure_dir(mounts["pids"], own["pids"], name))
    if "unified" in mounts:
        return _find_v2(mounts["unified"], own[""], name)
    raise LookupError("no cgroup memory+pids controllers are mounted")


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller ("" for v2), from /proc/self/cgroup."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    return own


def _find_v2(root: Path, own: str, name: str) -> Cgroups:
    base = root / own.lstrip("/")
    available = (base / "cgroup.controllers").read_text().split()
    if missing := {"memory", "pids"} - set(available):
        raise LookupError(f"cgroup2 at {base} lacks the {', '.join(sorted(missing))} "
                          f"controller(s) (bound to v1, or not delegated)")
    # Handing controllers down needs a cgroup without processes (true only of the root
    # cgroup here); elsewhere they must already be enabled for our children.
    enabled = (base / "cgroup.subtree_control").read_text().split()
    if {"memory", "pids"} - set(enabled):
        (base / "cgroup.subtree_control").write_text("+memory +pids")
    parent = _ensure_dir(root, own, name)
    (parent / "cgroup.subtree_control").write_text("+memory +pids")
    return Cgroups(version=2, memory_parent=parent, pids_parent=parent)


def _ensure_dir(mount: Path, own: str, name: str) -> Path:
    path = mount / own.lstrip("/") / name
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
