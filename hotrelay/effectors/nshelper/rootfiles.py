"""Files read inside a container's root, safely: what both the daemon and a helper use.

Every path component is resolved *inside* the root, as the container itself would:
``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, or on kernels before 5.6 a
component-by-component walk with O_NOFOLLOW that re-roots absolute symlinks and
clamps ``..`` at the root. A symlink such as ``/etc/group -> /host/etc/group``
therefore names the container's ``/host/etc/group``, never the host's; a magic link
(``/proc/self/root/...``) is refused. A file is opened O_PATH and its type checked
before it is opened for reading: only a regular file of bounded size is read.

This module imports nothing of the daemon's (no trio): the namespace helpers run it.
"""

from __future__ import annotations

import errno
import os
import stat

from hotrelay.errors import HotrelayError
from hotrelay.kernel import mount

__all__ = [
    "ACCOUNT_FILES",
    "MAX_ACCOUNT_FILE",
    "AccountFileError",
    "open_in_root",
    "read_account_file",
    "read_file_in_root",
]

MAX_ACCOUNT_FILE = 4 * 1024 * 1024
MAX_SYMLINKS = 40  # the kernel's own limit on symlinks followed in one lookup
ACCOUNT_FILES = ("etc/passwd", "etc/group")


class AccountFileError(HotrelayError):
    """A container's /etc/passwd or /etc/group could not be read safely."""


_openat2_missing = False


def _walk_in_root(root_fd: int, path: str, flags: int) -> int:
    """RESOLVE_IN_ROOT by hand: each component opened O_PATH|O_NOFOLLOW from a dirfd."""
    todo = [c for c in path.split("/") if c]
    stack = [os.dup(root_fd)]  # directories from the root down to the current one
    links = 0
    try:
        while todo:
            component = todo.pop(0)
            if component == ".":
                continue
            if component == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            current = stack[-1]
            fd = os.open(component, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(component, dir_fd=current)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo = [c for c in target.split("/") if c] + todo
                continue
            if not todo:
                os.close(fd)
                # O_NOFOLLOW: if it was swapped for a symlink since, this fails (ELOOP).
                return os.open(component, flags | os.O_NOFOLLOW, dir_fd=current)
            if not stat.S_ISDIR(mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            stack.append(fd)
        return os.open(".", flags, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(root_fd: int, path: str, flags: int = os.O_RDONLY, *, walk: bool = False) -> int:
    """Open ``path`` resolved inside the directory ``root_fd`` as if it were ``/``.

    ``walk`` forces the portable walk (openat2 is used when the kernel has it).
    """
    global _openat2_missing
    # openat2 rejects flags O_PATH does not take (EINVAL), O_NOCTTY among them.
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
    if not walk and not _openat2_missing:
        try:
            return mount.openat2(
                root_fd, path, flags, resolve=mount.RESOLVE_IN_ROOT | mount.RESOLVE_NO_MAGICLINKS
            )
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _openat2_missing = True
    return _walk_in_root(root_fd, path, flags)


def read_file_in_root(
    root_fd: int, path: str, *, limit: int = MAX_ACCOUNT_FILE, walk: bool = False
) -> bytes:
    """A regular file's content, read inside the root, at most ``limit`` bytes.

    The file is first opened O_PATH, which runs no open() of the file's own (no
    driver's, no FIFO's), and its type checked on that inode. Only a regular file is
    then opened for reading, and through that same descriptor (/proc/self/fd/N names
    the inode already checked, whatever the container renames meanwhile): a device
    node planted at /etc/group, such as a watchdog's, is never opened.
    """
    try:
        path_fd = open_in_root(root_fd, path, os.O_PATH, walk=walk)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            # RESOLVE_NO_MAGICLINKS refuses /proc/PID/root-style links with ELOOP too.
            reason = "a symlink loop or a magic link (/proc/...), refused"
        elif exc.errno == errno.EXDEV:
            reason = "the path escapes the container root, refused"
        raise AccountFileError(f"/{path}: {reason}") from exc
    try:
        checked = os.fstat(path_fd)
        if not stat.S_ISREG(checked.st_mode):
            raise AccountFileError(
                f"/{path}: not a regular file ({_file_type(checked.st_mode)}); never opened"
            )
        if checked.st_size > limit:
            raise AccountFileError(
                f"/{path}: {checked.st_size} bytes is over the {limit} byte limit"
            )
        fd = os.open(
            f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        )
    finally:
        os.close(path_fd)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise AccountFileError(f"/{path}: changed while it was being opened")
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise AccountFileError(f"/{path}: more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


_FILE_TYPES = (
    (stat.S_ISCHR, "a character device node"),
    (stat.S_ISBLK, "a block device node"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symlink"),
)


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), f"mode {mode:o}")


def read_account_file(root_fd: int, path: str, walk: bool = False) -> str:
    """The file's text; "" if it does not exist (but not if it is a dangling symlink)."""
    try:
        data = read_file_in_root(root_fd, path, walk=walk)
    except AccountFileError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
        target = _symlink_target(root_fd, path, walk)
        if target is None:
            return ""
        raise AccountFileError(
            f"/{path} is a symlink to {target!r}, which does not exist inside the container "
            "(it is resolved in the container's root, never on the host)"
        ) from None
    return data.decode("utf-8", errors="replace")


def _symlink_target(root_fd: int, path: str, walk: bool) -> str | None:
    parent, _, name = path.rpartition("/")
    try:
        parent_fd = open_in_root(root_fd, parent or ".", os.O_PATH | os.O_DIRECTORY, walk=walk)
    except OSError:
        return None
    try:
        if not stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            return None
        return os.readlink(name, dir_fd=parent_fd)
    except OSError:
        return None
    finally:
        os.close(parent_fd)
