"""Namespaces of another process, opened race-free and joined.

A pid can be recycled the moment its process dies, so everything about a container
is opened while a pidfd pins the process: open the pidfd, open /proc/PID/..., then
check that the pidfd has not signalled an exit. If it has not, every file opened in
between belonged to that very process. The namespace inodes are checked against what
the runtime adapter reported, which catches a pid reused before the pidfd was taken.
"""

from __future__ import annotations

import os
import select
from collections.abc import Mapping

from hotrelay.kernel import libc

__all__ = [
    "NAMESPACE_FLAGS",
    "NamespaceChangedError",
    "is_alive",
    "join",
    "namespace_inode",
    "open_namespace",
    "open_pidfd",
    "open_root",
    "own_namespace_inode",
    "start_time",
]

NAMESPACE_FLAGS: Mapping[str, int] = {
    "mnt": libc.CLONE_NEWNS,
    "net": libc.CLONE_NEWNET,
    "user": libc.CLONE_NEWUSER,
    "pid": libc.CLONE_NEWPID,
    "uts": libc.CLONE_NEWUTS,
    "ipc": libc.CLONE_NEWIPC,
    "cgroup": libc.CLONE_NEWCGROUP,
}


class NamespaceChangedError(ProcessLookupError):
    """The process behind a pid is not (or no longer) the one we were told about."""


def open_pidfd(pid: int) -> int:
    """A pidfd for pid (close-on-exec); ProcessLookupError if it is gone."""
    return os.pidfd_open(pid)


def is_alive(pidfd: int) -> bool:
    """False once the process behind pidfd has exited (the pidfd turns readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def open_namespace(pid: int, kind: str, expected_inode: int | None = None) -> int:
    """An fd for /proc/PID/ns/KIND, checked against the inode the runtime reported."""
    if kind not in NAMESPACE_FLAGS:
        raise ValueError(f"unknown namespace kind {kind!r}")
    fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        inode = os.fstat(fd).st_ino
        if expected_inode is not None and inode != expected_inode:
            raise NamespaceChangedError(
                f"pid {pid}: {kind} namespace is {inode}, expected {expected_inode} "
                "(the container restarted or the pid was reused)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root(pid: int) -> int:
    """An O_PATH fd for the process's root directory (its container's /)."""
    return os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the start time in clock ticks since boot."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name is parenthesised and may itself contain spaces and ')'.
    return int(text.rpartition(b")")[2].split()[19])


def namespace_inode(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def own_namespace_inode(kind: str) -> int:
    return namespace_inode(os.getpid(), kind)


def join(fd: int, kind: str) -> None:
    """setns() into the namespace behind fd. Joining a mount namespace needs a
    single-threaded caller (the kernel refuses with EINVAL otherwise)."""
    libc.setns(fd, NAMESPACE_FLAGS[kind])
