"""Thin, typed ctypes wrappers for the syscalls Python 3.11's os module lacks.

Each wrapper raises OSError with the real errno, so callers handle failures the
same way they handle os.* failures. Constants come from the kernel UAPI headers
(linux/sched.h, linux/mount.h, sys/mount.h).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import NoReturn

libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1

libc.unshare.argtypes = (ctypes.c_int,)
libc.unshare.restype = ctypes.c_int
libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
libc.setns.restype = ctypes.c_int
libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
libc.mount.restype = ctypes.c_int
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
libc.umount2.restype = ctypes.c_int
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
libc.prctl.restype = ctypes.c_int


def oserror(name: str, path: str | os.PathLike[str] | None = None) -> NoReturn:
    """Raise OSError for the errno the last libc call left behind.

    ENOSYS names the running kernel, since that is the only useful hint for a
    syscall this kernel does not provide.
    """
    err = ctypes.get_errno()
    message = os.strerror(err)
    if err == 0:
        message = "failed without setting errno"
    elif err == 38:  # ENOSYS
        message = f"{message} (kernel {platform.release()} lacks {name})"
    if path is None:
        raise OSError(err, f"{name}: {message}")
    raise OSError(err, f"{name}: {message}", os.fspath(path))


def _encode(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    if libc.unshare(flags) < 0:
        oserror("unshare")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace behind fd; nstype 0 accepts any kind."""
    if libc.setns(fd, nstype) < 0:
        oserror("setns")


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int,
    data: str | None,
) -> None:
    if libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) < 0:
        oserror("mount", target)


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    if libc.umount2(_encode(target), flags) < 0:
        oserror("umount2", target)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send signum when the parent (thread) that forked us exits."""
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) < 0:
        oserror("prctl(PR_SET_PDEATHSIG)")


def malloc_trim() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim(0)).

    True if memory was released; False if none was, or the C library has no such call.
    """
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return bool(trim(0))
