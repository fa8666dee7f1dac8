"""The weak mode (``allow_weak``): the harness as a plain process, and workdir removal.

Only for machines where bubblewrap cannot start and the operator said so explicitly. It is not a
sandbox: programs see the host's files and sockets, keep the caller's uid when it is not root
(root: they run as 65534 with no groups), and are bounded only by rlimits, the wall-clock limit
and, as root, the per-sample cgroups. What it still guarantees is cleanup: every process group
the harness reports is killed and the workdir on the host is removed by :func:`remove_tree`,
whatever the program left in it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile


def make_workdir(owner: tuple[int, int] | None) -> str:
    """A fresh 0700 directory under the temp dir, owned by ``owner`` (uid, gid) if given."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="rolegraph-sandbox-"))
    if owner is not None:
        os.chown(path, *owner)
    return path


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it: any depth, any permissions; never follows a
    symlink. Iterative, holding one directory fd at a time (a 3000-deep tree is longer than
    PATH_MAX and deeper than Python's recursion limit, which break ``shutil.rmtree``)."""
    parent = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        current = _open_dir(os.path.basename(path), parent)
    except FileNotFoundError:
        os.close(parent)
        return
    names = [os.path.basename(path)]  # the path from `parent` down to `current`
    try:
        while names:
            sub = _empty_files(current)
            if sub is not None:  # descend; ".." brings us back (nothing runs here any more)
                child = _open_dir(sub, current)
                os.close(current)
                current, names = child, [*names, sub]
                continue
            up = parent if len(names) == 1 else os.open("..", os.O_RDONLY | os.O_DIRECTORY,
                                                        dir_fd=current)
            os.close(current)
            os.rmdir(names.pop(), dir_fd=up)
            current = up
    finally:
        with contextlib.suppress(OSError):
            os.close(current)
        if current != parent:
            os.close(parent)


def _open_dir(name: str, dir_fd: int) -> int:
    """Open subdirectory ``name`` for listing, made 0700 first (a 000 directory cannot be
    opened by its owner). Through an O_PATH descriptor, so that the chmod can never follow a
    symlink swapped in for the directory."""
    path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        itself = f"/proc/self/fd/{path_fd}"
        with contextlib.suppress(OSError):
            os.chmod(itself, stat.S_IRWXU)
        return os.open(itself, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(path_fd)


def _empty_files(dir_fd: int) -> str | None:
    """Unlink every non-directory in ``dir_fd``; the name of a subdirectory, or None if empty."""
    for name in os.listdir(dir_fd):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.EPERM):
                raise
            return name
    return None
