"""User and group names resolved the way the container sees them.

A rule says ``owner = "root"`` and ``group = "dialout"``: those names mean what the
container's own /etc/passwd and /etc/group say, and the ids are then mapped to host ids
through the container's user namespace. The files are read through the container's
root (/proc/PID/root) with every path component resolved *inside* that root, as the
container itself would: ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, or on
kernels before 5.6 a component-by-component walk with O_NOFOLLOW that re-roots
absolute symlinks and clamps ``..`` at the root. A symlink such as ``/etc/group ->
/host/etc/group`` therefore names the container's ``/host/etc/group``, never the
host's; a magic link (``/proc/self/root/...``) is refused. The file must be a regular
file of bounded size, opened with O_NONBLOCK so a FIFO cannot stall the daemon.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import trio

from hotrelay.core.accounts import Accounts, IdKind, to_host_id
from hotrelay.core.containers import ContainerRef
from hotrelay.errors import HotrelayError
from hotrelay.kernel import mount
from hotrelay.runtimes.procfs import PidHandle

__all__ = [
    "MAX_ACCOUNT_FILE",
    "AccountFileError",
    "Owner",
    "open_in_root",
    "read_accounts",
    "read_file_in_root",
    "resolve_owner",
    "resolve_owner_async",
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
    """A regular file's content, read inside the root, at most ``limit`` bytes."""
    try:
        fd = open_in_root(root_fd, path, os.O_RDONLY | os.O_NONBLOCK, walk=walk)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            # RESOLVE_NO_MAGICLINKS refuses /proc/PID/root-style links with ELOOP too.
            reason = "a symlink loop or a magic link (/proc/...), refused"
        elif exc.errno == errno.EXDEV:
            reason = "the path escapes the container root, refused"
        raise AccountFileError(f"/{path}: {reason}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AccountFileError(f"/{path}: not a regular file")
        if st.st_size > limit:
            raise AccountFileError(f"/{path}: {st.st_size} bytes is over the {limit} byte limit")
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


def read_accounts(
    pid: int, *, expected_start_time: int | None = None, walk: bool = False
) -> Accounts:
    """The users and groups of the container whose init is ``pid``.

    A missing file means no names (numeric ids still work); anything unsafe (symlink
    escaping the root through a magic link, FIFO, huge file) raises AccountFileError.
    """
    with PidHandle.open(pid, expected_start_time=expected_start_time) as handle:
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Still alive after the open: the root is that process's root.
            handle.check_alive()
            texts = [_read_account_file(root_fd, path, walk) for path in ACCOUNT_FILES]
        finally:
            os.close(root_fd)
    return Accounts.parse(texts[0], texts[1], where=f"the container of pid {pid}")


def _read_account_file(root_fd: int, path: str, walk: bool) -> str:
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


@dataclass(frozen=True, slots=True)
class Owner:
    """An owner and group, as the container names them and as host ids."""

    uid: int
    gid: int
    host_uid: int
    host_gid: int


def resolve_owner(
    container: ContainerRef,
    *,
    user: str | int = 0,
    group: str | int = 0,
    walk: bool = False,
) -> Owner:
    """Turn ``user``/``group`` (names or numbers) into the container's and the host's ids.

    Names are looked up in the container (blocking file reads: from async code use
    :func:`resolve_owner_async`). Raises UnknownAccountError for a name the container
    does not have, UnmappedIdError for an id its user namespace does not map.
    """
    accounts = (
        read_accounts(container.pid, expected_start_time=container.start_time, walk=walk)
        if _names_in(user, group)
        else Accounts()
    )
    uid = accounts.uid(user)
    gid = accounts.gid(group)
    return Owner(
        uid=uid,
        gid=gid,
        host_uid=to_host_id(container.uid_map, uid, IdKind.USER),
        host_gid=to_host_id(container.gid_map, gid, IdKind.GROUP),
    )


def _names_in(user: str | int, group: str | int) -> bool:
    """Whether resolving needs the container's account files (a name, not a number)."""
    return any(isinstance(v, str) and not v.isdigit() for v in (user, group))


async def resolve_owner_async(
    container: ContainerRef, *, user: str | int = 0, group: str | int = 0
) -> Owner:
    if not _names_in(user, group):
        # Numbers only (the default): no file to read, so no thread hop, which would
        # cost a good part of a millisecond on the hotplug path.
        await trio.lowlevel.checkpoint()
        return resolve_owner(container, user=user, group=group)
    return await trio.to_thread.run_sync(lambda: resolve_owner(container, user=user, group=group))
