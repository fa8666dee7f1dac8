"""The sandbox's seccomp filter: a classic-BPF program that bubblewrap installs (``--seccomp FD``).

What the namespaces already do, and what this adds. The mount namespace shows only the runtime
(read-only) and the sample's own tmpfs, so the only AF_UNIX *path* sockets a program can reach are
ones it binds itself in its workdir; the network namespace is private, so AF_INET/AF_INET6 reach
only the sandbox's own loopback and AF_UNIX *abstract* names only the sandbox's own sockets. Other
families are not all confined by a network namespace (AF_VSOCK reaches the hypervisor, AF_NETLINK
families such as audit or uevents talk to the host kernel, AF_ALG/AF_BLUETOOTH/... are kernel
attack surface), so the filter allows ``socket``/``socketpair`` only for AF_UNIX, AF_INET and
AF_INET6. It also closes what would undo that or reach the host kernel's shared state:

* ``io_uring_*`` (IORING_OP_SOCKET creates sockets without the ``socket`` syscall);
* new namespaces (``unshare``, ``setns``, ``clone`` with CLONE_NEW* flags; ``clone3`` gets
  ENOSYS, so libc falls back to ``clone``, whose flags a filter can read);
* keyrings (``add_key``/``keyctl``/``request_key``: not namespaced, shared by every sandbox of a
  host uid), ``bpf``, ``perf_event_open``, ``userfaultfd``;
* tracing and reading other processes (``ptrace``, ``process_vm_*``, ``pidfd_getfd``,
  ``process_madvise``), mounts, ``chroot``, file handles (``open_by_handle_at``).

Refused calls fail with an errno (EAFNOSUPPORT for socket families, ENOSYS for io_uring and
clone3, EPERM otherwise), so programs see an ordinary error. A syscall from another ABI (i386
``int 0x80`` on x86-64, x32) kills the process: its numbers differ, so the table would not apply.
"""
from __future__ import annotations

import errno
import platform
import socket
import struct
from dataclasses import dataclass

# struct seccomp_data: nr (u32) at 0, arch (u32) at 4, instruction pointer at 8, args (u64 each)
# from 16; the low 32 bits of an argument come first on these little-endian ABIs.
_NR, _ARCH = 0, 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i


_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K
_RET_KILL_PROCESS, _RET_ALLOW = 0x8000_0000, 0x7FFF_0000
_X32_SYSCALL_BIT = 0x4000_0000

ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
"""Socket families a program may create (the namespaces confine these; see the module docstring)."""
# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (CLONE_NEWTIME is clone3/unshare only:
# in clone() its bit belongs to the exit signal)
_NEW_NAMESPACE_FLAGS = 0x7E02_0000


@dataclass(frozen=True, slots=True)
class _Abi:
    audit_arch: int
    syscalls: dict[str, int]
    x32: bool = False


_REFUSED = ("unshare", "setns", "add_key", "keyctl", "request_key", "bpf", "perf_event_open",
            "userfaultfd", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
            "process_madvise", "mount", "umount2", "pivot_root", "chroot", "open_tree",
            "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
            "name_to_handle_at", "open_by_handle_at")
_ENOSYS = ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3")

# From the kernel's uapi headers (asm/unistd_64.h; asm-generic/unistd.h for aarch64).
_ABIS = {
    "x86_64": _Abi(audit_arch=0xC000_003E, x32=True, syscalls=dict(
        socket=41, socketpair=53, clone=56, clone3=435, unshare=272, setns=308, add_key=248,
        request_key=249, keyctl=250, bpf=321, perf_event_open=298, userfaultfd=323, ptrace=101,
        process_vm_readv=310, process_vm_writev=311, pidfd_getfd=438, process_madvise=440,
        mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
        name_to_handle_at=303, open_by_handle_at=304, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427)),
    "aarch64": _Abi(audit_arch=0xC000_00B7, syscalls=dict(
        socket=198, socketpair=199, clone=220, clone3=435, unshare=97, setns=268, add_key=217,
        request_key=218, keyctl=219, bpf=280, perf_event_open=241, userfaultfd=282, ptrace=117,
        process_vm_readv=270, process_vm_writev=271, pidfd_getfd=438, process_madvise=440,
        mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442,
        name_to_handle_at=264, open_by_handle_at=265, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427)),
}


def seccomp_filter(machine: str | None = None) -> bytes:
    """The filter as ``struct sock_filter[]`` bytes, for ``bwrap --seccomp``.

    ``machine`` is ``platform.machine()`` by default; an architecture without a syscall table
    here raises ValueError naming the supported ones.
    """
    machine = machine or platform.machine()
    if machine not in _ABIS:
        raise ValueError(f"seccomp filter: no syscall table for {machine!r} "
                         f"(supported: {', '.join(_ABIS)})")
    return _assemble(_program(_ABIS[machine]))


def _errno(code: int) -> int:
    return 0x0005_0000 | code  # SECCOMP_RET_ERRNO


def _program(abi: _Abi) -> list[tuple]:
    """Instructions as (opcode, k, true_label, false_label) or ("label", name)."""
    nr = abi.syscalls
    prog: list[tuple] = [
        (_LD_ABS_W, _ARCH), (_JEQ, abi.audit_arch, None, "kill"),
        (_LD_ABS_W, _NR),
    ]
    if abi.x32:
        prog.append((_JGE, _X32_SYSCALL_BIT, "kill", None))
    prog += [(_JEQ, nr["socket"], "family", None), (_JEQ, nr["socketpair"], "family", None),
             (_JEQ, nr["clone"], "clone_flags", None)]
    prog += [(_JEQ, nr[name], "enosys", None) for name in _ENOSYS]
    prog += [(_JEQ, nr[name], "eperm", None) for name in _REFUSED]
    prog += [(_RET, _RET_ALLOW)]
    prog += [("label", "family"), (_LD_ABS_W, _arg_low(0))]
    prog += [(_JEQ, family, "allow", None) for family in ALLOWED_FAMILIES]
    prog += [(_RET, _errno(errno.EAFNOSUPPORT))]
    prog += [("label", "clone_flags"), (_LD_ABS_W, _arg_low(0)),
             (_JSET, _NEW_NAMESPACE_FLAGS, "eperm", "allow")]
    prog += [("label", "allow"), (_RET, _RET_ALLOW),
             ("label", "eperm"), (_RET, _errno(errno.EPERM)),
             ("label", "enosys"), (_RET, _errno(errno.ENOSYS)),
             ("label", "kill"), (_RET, _RET_KILL_PROCESS)]
    return prog


def _assemble(prog: list[tuple]) -> bytes:
    """Resolve labels into BPF's relative jump offsets (None: fall through) and pack."""
    labels: dict[str, int] = {}
    code: list[tuple] = []
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = len(code)
        else:
            code.append(ins)
    out = bytearray()
    for pc, ins in enumerate(code):
        op, k = ins[0], ins[1]
        jt = jf = 0
        if len(ins) == 4:
            jt, jf = (0 if t is None else labels[t] - pc - 1 for t in ins[2:])
        assert 0 <= jt < 256 and 0 <= jf < 256, "jump out of range"
        out += struct.pack("=HBBI", op, jt, jf, k)
    return bytes(out)
