"""Typed ctypes wrappers for the new mount API, openat2 and fs-id switching.

Python 3.11's os module has none of these. Each wrapper raises OSError with the real
errno (via ``libc.oserror``), like the os functions do. Syscall numbers are the
unified ones every architecture except alpha uses for syscalls added after 5.1
(include/uapi/asm-generic/unistd.h), so they hold on x86_64 and aarch64 alike.
Constants come from linux/mount.h, linux/openat2.h and linux/fcntl.h.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from hotrelay.kernel.libc import oserror

__all__ = [
    "AT_EMPTY_PATH",
    "AT_RECURSIVE",
    "AT_SYMLINK_NOFOLLOW",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "RAMFS_MAGIC",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "TMPFS_MAGIC",
    "UMOUNT_NOFOLLOW",
    "empty_detached_tmpfs",
    "fchownat_empty",
    "fs_ids",
    "fs_type",
    "get_fsgid",
    "get_fsuid",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "openat2",
    "set_fsgid",
    "set_fsuid",
]

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

MOVE_MOUNT_F_SYMLINKS = 0x01
MOVE_MOUNT_F_AUTOMOUNTS = 0x02
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

UMOUNT_NOFOLLOW = 0x8


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


# Our own handle: argtypes/restype set here must not leak into hotrelay.kernel.libc's.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.setfsuid.argtypes = (ctypes.c_uint,)
libc.setfsuid.restype = ctypes.c_int
libc.setfsgid.argtypes = (ctypes.c_uint,)
libc.setfsgid.restype = ctypes.c_int
libc.fchownat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int)
libc.fchownat.restype = ctypes.c_int

_C_INT = ctypes.c_int
_C_UINT = ctypes.c_uint
_C_PATH = ctypes.c_char_p


def _path(path: str | os.PathLike[str]) -> bytes:
    return os.fsencode(path)


def open_tree(dirfd: int, path: str | os.PathLike[str], flags: int) -> int:
    """A file descriptor for the mount at path; with OPEN_TREE_CLONE a detached copy.

    The source must be in the caller's mount namespace, so a tree meant for another
    namespace is cloned before joining it and handed over as an fd.
    """
    fd = libc.syscall(SYS_OPEN_TREE, _C_INT(dirfd), _C_PATH(_path(path)), _C_UINT(flags))
    if fd < 0:
        oserror("open_tree", path)
    return int(fd)


def move_mount(
    from_dirfd: int,
    from_path: str | os.PathLike[str],
    to_dirfd: int,
    to_path: str | os.PathLike[str],
    flags: int,
) -> None:
    """Attach (or move) the mount at from_dirfd/from_path onto to_dirfd/to_path."""
    result = libc.syscall(
        SYS_MOVE_MOUNT,
        _C_INT(from_dirfd),
        _C_PATH(_path(from_path)),
        _C_INT(to_dirfd),
        _C_PATH(_path(to_path)),
        _C_UINT(flags),
    )
    if result < 0:
        oserror("move_mount", to_path)


def mount_setattr(
    dirfd: int,
    path: str | os.PathLike[str],
    flags: int,
    *,
    attr_set: int = 0,
    attr_clr: int = 0,
) -> None:
    """Change per-mount flags (nodev, nosuid, ...) of the mount at dirfd/path."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    result = libc.syscall(
        SYS_MOUNT_SETATTR,
        _C_INT(dirfd),
        _C_PATH(_path(path)),
        _C_UINT(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result < 0:
        oserror("mount_setattr", path)


TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fstatfs.restype = ctypes.c_int


def fs_type(fd: int) -> int:
    """The filesystem magic number (statfs f_type) of what fd refers to."""
    # struct statfs is at most 120 bytes on 64-bit Linux; f_type (a long) comes first.
    buffer = ctypes.create_string_buffer(256)
    if libc.fstatfs(fd, buffer) < 0:
        oserror("fstatfs")
    return int(ctypes.c_long.from_buffer(buffer).value) & 0xFFFFFFFF


_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6


def empty_detached_tmpfs() -> int:
    """An fd of the root of a new, empty, read-only tmpfs that is attached nowhere.

    No path leads into it and nothing can be written to it: a process that makes it
    its root finds nothing by any absolute path.
    """
    fs = libc.syscall(SYS_FSOPEN, _C_PATH(b"tmpfs"), _C_UINT(_FSOPEN_CLOEXEC))
    if fs < 0:
        oserror("fsopen")
    try:
        for key, value in ((b"mode", b"0555"), (b"size", b"4k")):
            result = libc.syscall(
                SYS_FSCONFIG,
                _C_INT(fs),
                _C_UINT(_FSCONFIG_SET_STRING),
                _C_PATH(key),
                _C_PATH(value),
                _C_INT(0),
            )
            if result < 0:
                oserror("fsconfig")
        if libc.syscall(SYS_FSCONFIG, _C_INT(fs), _C_UINT(_FSCONFIG_CMD_CREATE), None, None, 0) < 0:
            oserror("fsconfig")
        attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
        fd = libc.syscall(SYS_FSMOUNT, _C_INT(fs), _C_UINT(_FSMOUNT_CLOEXEC), _C_UINT(attrs))
        if fd < 0:
            oserror("fsmount")
        return int(fd)
    finally:
        os.close(fs)


def openat2(
    dirfd: int, path: str | os.PathLike[str], flags: int, *, mode: int = 0, resolve: int = 0
) -> int:
    """openat() with RESOLVE_* restrictions applied by the kernel during the lookup.

    The restrictions hold for every component, atomically: no window between a check
    and the use in which a container could swap a directory for a symlink.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = libc.syscall(
        SYS_OPENAT2,
        _C_INT(dirfd),
        _C_PATH(_path(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        oserror("openat2", path)
    return int(fd)


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """chown the very inode fd refers to, even an O_PATH fd (AT_EMPTY_PATH).

    os.chown(fd) uses fchown(), which O_PATH descriptors do not support; going by fd
    rather than by name means a racing rename cannot redirect the chown.
    """
    if libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0:
        oserror("fchownat")


# setfsuid/setfsgid cannot report errors; they return the previous id, and asking
# for an id that cannot be set leaves it unchanged. -1 (as unsigned) only queries.
_QUERY = 0xFFFFFFFF


def get_fsuid() -> int:
    return int(libc.setfsuid(_QUERY))


def get_fsgid() -> int:
    return int(libc.setfsgid(_QUERY))


def set_fsuid(uid: int) -> int:
    """Set the filesystem uid of the calling thread; returns the previous one."""
    previous = int(libc.setfsuid(uid))
    if get_fsuid() != uid:
        raise PermissionError(f"setfsuid({uid}) did not take effect (fsuid is {get_fsuid()})")
    return previous


def set_fsgid(gid: int) -> int:
    """Set the filesystem gid of the calling thread; returns the previous one."""
    previous = int(libc.setfsgid(gid))
    if get_fsgid() != gid:
        raise PermissionError(f"setfsgid({gid}) did not take effect (fsgid is {get_fsgid()})")
    return previous


@contextmanager
def fs_ids(uid: int, gid: int) -> Iterator[None]:
    """Create files as uid:gid for the duration (per thread: single-threaded callers only).

    A filesystem mounted inside a user namespace refuses to create inodes for ids it
    cannot map (EOVERFLOW), so host root must take on a mapped id first. Switching
    fsuid away from 0 also drops the filesystem capabilities (CAP_DAC_OVERRIDE,
    CAP_CHOWN, CAP_MKNOD...) until it is switched back.
    """
    old_gid = set_fsgid(gid)
    try:
        old_uid = set_fsuid(uid)
        try:
            yield
        finally:
            set_fsuid(old_uid)
    finally:
        set_fsgid(old_gid)
