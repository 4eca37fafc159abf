"""The long-lived namespace helper: one single-threaded process per container.

setns() into a mount namespace fails in a multi-threaded process, and the daemon runs
trio with worker threads, so the daemon never forks itself. For each container it
spawns ``python -m hotrelay.effectors.nshelper`` once, with one end of a
SOCK_SEQPACKET socketpair and descriptors the daemon opened while a pidfd pinned the
container's init (its mount and network namespaces and its root directory). The
helper joins those namespaces (never the user namespace: it stays host root with
every capability, and takes on the container's ids only per operation via
setfsuid/setfsgid or SCM_CREDENTIALS), stays single-threaded and serves small JSON
requests, one at a time, with descriptors passed as SCM_RIGHTS both ways. It exits
when the socket closes or the container's init dies; the daemon reaps it.

Why a process and not a thread or a fork of the daemon:
- only a single-threaded process may join a mount namespace;
- a container can hang any filesystem operation in its tree (a FUSE mount in its
  /dev), and only a process can be killed out of that: the client kills a helper
  that misses its deadline and starts a fresh one on the next request;
- it starts once per container (~50 ms) and then answers in ~0.1 ms.

Every path inside the container is resolved component by component from the root fd
with openat2(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH), and every
change is made relative to the directory fd that walk produced (mknodat, mkdirat,
symlinkat, unlinkat, move_mount onto the fd of the file we just created). A symlink
planted anywhere on the way is refused, never followed, so the helper can only ever
write inside the container's own /dev.

The helper imports everything before it joins the mount namespace: afterwards the
host's Python library may not be visible at all. It never imports trio (the client
half of this module does), so it starts fast and stays single-threaded.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno as errnos
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotrelay.errors import HotrelayError
from hotrelay.kernel import mount, ns
from hotrelay.kernel.libc import MNT_DETACH, umount2
from hotrelay.kernel.netlink import NETLINK_KOBJECT_UEVENT, UDEV_GROUP, send_credentials

if TYPE_CHECKING or __name__ != "__main__":
    # The daemon side only; see the module docstring for why the helper never loads it.
    import trio

    from hotrelay.core.containers import ContainerRef

__all__ = [
    "Created",
    "HelperError",
    "InjectionError",
    "NamespaceHelper",
    "NamespaceHelpers",
    "Removed",
    "TargetExistsError",
    "UnsafePathError",
    "split_dev_path",
]

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
DEFAULT_TIMEOUT = 5.0
DEFAULT_START_TIMEOUT = 15.0
# What a uevent socket needs from a kernel ack: nlmsghdr + the error code.
_NLMSGHDR = struct.Struct("=IHHII")
_NLMSG_ERROR = 0x2
_UEVENT_SEND = 0x10  # any type >= NLMSG_MIN_TYPE reaches uevent_net_rcv_skb()
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
NETLINK_ROUTE = 0
_NO_LINKS = mount.RESOLVE_NO_SYMLINKS | mount.RESOLVE_NO_MAGICLINKS | mount.RESOLVE_BENEATH
_NAME_MAX = 255


# -- errors (both sides) ----------------------------------------------------------------


class InjectionError(HotrelayError):
    """Putting something into a container, or taking it out, failed.

    The message names the container and the path inside it; ``errno`` is set when
    the kernel gave one. Nothing else is affected: the daemon reports it and goes on.
    """

    def __init__(
        self,
        container: str,
        message: str,
        *,
        path: str | None = None,
        errno: int | None = None,
    ) -> None:
        where = f"container {container}: {path}: " if path else f"container {container}: "
        super().__init__(where + message)
        self.container = container
        self.path = path
        self.errno = errno


class UnsafePathError(InjectionError):
    """The path would leave the container's /dev (a symlink on the way, '..', ...)."""


class TargetExistsError(InjectionError):
    """Something we did not create is already at the target; it was left alone."""


class HelperError(InjectionError):
    """The namespace helper could not be started, died, or missed its deadline."""


_ERROR_KINDS: dict[str, type[InjectionError]] = {
    "unsafe": UnsafePathError,
    "exists": TargetExistsError,
}


def split_dev_path(path: str) -> tuple[str, ...]:
    """'/dev/a/b' -> ('dev', 'a', 'b'); ValueError for anything not plainly below /dev.

    No '.', '..' or empty components, no NUL: the path is used component by
    component, so it must say exactly which names to walk.
    """
    if not isinstance(path, str) or not path.startswith("/dev/"):
        raise ValueError(f"{path!r} is not an absolute path below /dev")
    parts = tuple(path.split("/")[1:])
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise ValueError(f"{path!r} has an empty, '.' or '..' component (or a NUL)")
        if len(os.fsencode(part)) > _NAME_MAX:
            raise ValueError(f"{path!r}: component {part[:32]!r}... is too long")
    return parts


@dataclass(frozen=True, slots=True)
class Created:
    """What the helper created besides the object itself: directories, outermost first."""

    dirs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Removed:
    """What a removal did: paths removed, and (path, why) for what it left alone."""

    removed: tuple[str, ...] = ()
    left: tuple[tuple[str, str], ...] = ()


# -- the helper process (server side) ---------------------------------------------------


class _Failure(Exception):
    """An expected failure, reported to the client as-is."""

    def __init__(self, kind: str, message: str, *, path: str | None, errno: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path = path
        self.errno = errno

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "path": self.path, "errno": self.errno}


def _describe(st: os.stat_result, link: str | None = None) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return f"a symlink to {link!r}" if link is not None else "a symlink"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        kind = "block" if stat.S_ISBLK(mode) else "character"
        return f"a {kind} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return f"a regular file ({st.st_size} bytes)"
    return f"a file of type {stat.S_IFMT(mode):o}"


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _readlink(dirfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dirfd)
    except OSError:
        return None


def _is_device(st: os.stat_result | None, kind: str, major: int, minor: int) -> bool:
    if st is None:
        return False
    is_kind = stat.S_ISBLK(st.st_mode) if kind == "b" else stat.S_ISCHR(st.st_mode)
    return is_kind and st.st_rdev == os.makedev(major, minor)


@contextlib.contextmanager
def _as_ids(uid: int, gid: int) -> Iterator[None]:
    """Create files as uid:gid (host ids). Host root keeps its capabilities for 0:0."""
    if uid == 0 and gid == 0:
        yield
        return
    with mount.fs_ids(uid, gid):
        yield


class _Inside:
    """The helper's state and operations, once it is in the container's namespaces."""

    def __init__(self, container: str, root_fd: int, *, has_net: bool) -> None:
        self.container = container
        self.root_fd = root_fd
        self.has_net = has_net
        self._uevent_sock: socket.socket | None = None
        self._seq = 0

    # -- walking --------------------------------------------------------------------

    def _open_dir(self, parent: int, name: str, shown: str, path: str) -> int:
        try:
            return mount.openat2(
                parent, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, resolve=_NO_LINKS
            )
        except OSError as exc:
            if exc.errno == errnos.ENOENT:
                raise
            st = _lstat(parent, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise _Failure(
                    "unsafe",
                    f"{shown} is {_describe(st, _readlink(parent, name))}; refusing to follow it",
                    path=path,
                ) from None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise _Failure(
                    "unsafe", f"{shown} is {_describe(st)}, not a directory", path=path
                ) from None
            raise

    def _walk(self, path: str, *, create: tuple[int, int] | None) -> tuple[int, str, list[str]]:
        """(fd of the parent directory, leaf name, directories created on the way).

        With ``create`` (host uid, gid), missing directories below /dev are made
        (mode 0755) as those ids; /dev itself must exist.
        """
        try:
            parts = split_dev_path(path)
        except ValueError as exc:
            raise _Failure("unsafe", str(exc), path=path) from None
        if len(parts) < 2:
            raise _Failure("unsafe", "names /dev itself", path=path)
        created: list[str] = []
        current = self.root_fd
        try:
            for depth, name in enumerate(parts[:-1]):
                shown = "/" + "/".join(parts[: depth + 1])
                try:
                    fd = self._open_dir(current, name, shown, path)
                except FileNotFoundError:
                    if create is None:
                        raise
                    if depth == 0:
                        raise _Failure("invalid", "the container has no /dev", path=path) from None
                    with _as_ids(*create):
                        try:
                            os.mkdir(name, 0o755, dir_fd=current)
                            created.append(shown)
                        except FileExistsError:
                            pass  # made concurrently by the container: use it if it is a dir
                    fd = self._open_dir(current, name, shown, path)
                if current != self.root_fd:
                    os.close(current)
                current = fd
        except BaseException:
            if current != self.root_fd:
                os.close(current)
            self._remove_dirs(created)
            raise
        return current, parts[-1], created

    def _remove_dirs(self, dirs: Sequence[str]) -> list[tuple[str, str]]:
        """rmdir what we created, deepest first; a directory in use is left (and said)."""
        left: list[tuple[str, str]] = []
        for shown in sorted(dirs, key=len, reverse=True):
            try:
                parent, name, _ = self._walk(shown, create=None)
            except FileNotFoundError:
                continue
            except _Failure as failure:
                left.append((shown, failure.message))
                continue
            try:
                st = _lstat(parent, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    link = _readlink(parent, name)
                    left.append((shown, f"is now {_describe(st, link)}; left alone"))
                    continue
                os.rmdir(name, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errnos.ENOTEMPTY, errnos.EEXIST, errnos.EBUSY):
                    raise
                left.append((shown, f"directory not removed: {os.strerror(exc.errno)}"))
            finally:
                os.close(parent)
        return left

    def _refuse_existing(self, parent: int, name: str, path: str) -> None:
        st = _lstat(parent, name)
        if st is not None:
            raise _Failure(
                "exists",
                f"already exists as {_describe(st, _readlink(parent, name))}, "
                "not created by hotrelay; left alone",
                path=path,
            )

    # -- operations -----------------------------------------------------------------

    def make_node(
        self,
        path: str,
        kind: str,
        major: int,
        minor: int,
        mode: int,
        uid: int,
        gid: int,
        dir_uid: int,
        dir_gid: int,
    ) -> dict[str, Any]:
        """mknod at path (privileged containers: their /dev honours device nodes)."""
        fmt = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
        parent, name, created = self._walk(path, create=(dir_uid, dir_gid))
        made = False
        try:
            self._refuse_existing(parent, name, path)
            try:
                # The helper's umask is 0, so mode is exact; mknodat never follows.
                os.mknod(name, fmt | (mode & 0o7777), os.makedev(major, minor), dir_fd=parent)
            except FileExistsError:
                self._refuse_existing(parent, name, path)
                raise
            made = True
            # chown through an O_PATH fd of the node itself: a rename racing us in the
            # container can at worst make us chown our own node somewhere else.
            node = mount.openat2(parent, name, os.O_PATH | os.O_NOFOLLOW, resolve=_NO_LINKS)
            try:
                if not _is_device(os.fstat(node), kind, major, minor):
                    raise _Failure("exists", "was replaced while being created", path=path)
                mount.fchownat_empty(node, uid, gid)
            finally:
                os.close(node)
        except BaseException:
            if made and _is_device(_lstat(parent, name), kind, major, minor):
                os.unlink(name, dir_fd=parent)
            self._remove_dirs(created)
            raise
        finally:
            os.close(parent)
        return {"dirs": created}

    def bind_node(
        self, path: str, kind: str, major: int, minor: int, dir_uid: int, dir_gid: int, tree: int
    ) -> dict[str, Any]:
        """Mount the detached node ``tree`` (made and owned on the host) onto a new empty
        file at path: for /dev filesystems that refuse device nodes (user namespaces)."""
        parent, name, created = self._walk(path, create=(dir_uid, dir_gid))
        placeholder = -1
        try:
            self._refuse_existing(parent, name, path)
            with _as_ids(dir_uid, dir_gid):
                placeholder = os.open(
                    name,
                    os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0,
                    dir_fd=parent,
                )
            mount.move_mount(
                tree,
                "",
                placeholder,
                "",
                mount.MOVE_MOUNT_F_EMPTY_PATH | mount.MOVE_MOUNT_T_EMPTY_PATH,
            )
        except BaseException:
            if placeholder >= 0:
                os.close(placeholder)
                placeholder = -1
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=parent)
            self._remove_dirs(created)
            raise
        finally:
            if placeholder >= 0:
                os.close(placeholder)
            os.close(parent)
        return {"dirs": created}

    def make_symlink(self, path: str, target: str, dir_uid: int, dir_gid: int) -> dict[str, Any]:
        parent, name, created = self._walk(path, create=(dir_uid, dir_gid))
        try:
            self._refuse_existing(parent, name, path)
            with _as_ids(dir_uid, dir_gid):
                os.symlink(target, name, dir_fd=parent)
        except BaseException:
            self._remove_dirs(created)
            raise
        finally:
            os.close(parent)
        return {"dirs": created}

    def _open_parent(self, path: str) -> tuple[int, str] | None:
        """The parent of path, or None if it is gone (so is everything below it)."""
        try:
            parent, name, _ = self._walk(path, create=None)
        except FileNotFoundError:
            return None
        return parent, name

    def remove_node(
        self, path: str, kind: str, major: int, minor: int, method: str, dirs: list[str]
    ) -> dict[str, Any]:
        removed: list[str] = []
        left: list[tuple[str, str]] = []
        try:
            opened = self._open_parent(path)
        except _Failure as failure:
            opened = None
            left.append((path, failure.message))
        if opened is not None:
            parent, name = opened
            try:
                self._remove_leaf_node(
                    parent, name, path, kind, major, minor, method, removed, left
                )
            finally:
                os.close(parent)
        left += self._remove_dirs(dirs)
        return {"removed": removed, "left": left}

    def _remove_leaf_node(
        self,
        parent: int,
        name: str,
        path: str,
        kind: str,
        major: int,
        minor: int,
        method: str,
        removed: list[str],
        left: list[tuple[str, str]],
    ) -> None:
        st = _lstat(parent, name)
        if st is None:
            return
        if method == "bind":
            if _is_device(st, kind, major, minor):
                # umount2 takes a path: go to the parent we resolved safely and name the
                # leaf alone; UMOUNT_NOFOLLOW keeps a swapped-in symlink from redirecting it.
                os.fchdir(parent)
                try:
                    umount2(name, MNT_DETACH | mount.UMOUNT_NOFOLLOW)
                except OSError as exc:
                    if exc.errno != errnos.EINVAL:  # EINVAL: not a mount point
                        raise
                finally:
                    os.chdir("/")
                st = _lstat(parent, name)
            # Our placeholder: the empty file the node was mounted on.
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(name, dir_fd=parent)
                removed.append(path)
                return
        elif _is_device(st, kind, major, minor):
            os.unlink(name, dir_fd=parent)
            removed.append(path)
            return
        if st is not None:
            left.append((path, f"is now {_describe(st, _readlink(parent, name))}; left alone"))

    def remove_symlink(self, path: str, target: str, dirs: list[str]) -> dict[str, Any]:
        removed: list[str] = []
        left: list[tuple[str, str]] = []
        try:
            opened = self._open_parent(path)
        except _Failure as failure:
            opened = None
            left.append((path, failure.message))
        if opened is not None:
            parent, name = opened
            try:
                st = _lstat(parent, name)
                link = _readlink(parent, name)
                if st is not None and stat.S_ISLNK(st.st_mode) and link == target:
                    os.unlink(name, dir_fd=parent)
                    removed.append(path)
                elif st is not None:
                    left.append((path, f"is now {_describe(st, link)}; left alone"))
            finally:
                os.close(parent)
        left += self._remove_dirs(dirs)
        return {"removed": removed, "left": left}

    def exists(self, path: str) -> dict[str, Any]:
        """Whether path exists in the container, symlinks resolved inside its root."""
        if not path.startswith("/"):
            raise _Failure("invalid", "not an absolute path", path=path)
        try:
            fd = mount.openat2(
                self.root_fd,
                path.lstrip("/"),
                os.O_PATH,
                resolve=mount.RESOLVE_IN_ROOT | mount.RESOLVE_NO_MAGICLINKS,
            )
        except OSError:
            return {"exists": False}
        os.close(fd)
        return {"exists": True}

    def _uevent_socket(self) -> socket.socket:
        if not self.has_net:
            raise _Failure(
                "invalid", "the helper is not in a network namespace of its own", path=None
            )
        if self._uevent_sock is None:
            # Created after setns(net): the socket lives in the container's netns.
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
            )
            sock.bind((0, 0))
            self._uevent_sock = sock
        return self._uevent_sock

    def send_uevent(self, wire: str, payload: str, uid: int, gid: int) -> dict[str, Any]:
        data = bytes.fromhex(payload)
        sock = self._uevent_socket()
        if wire == "udev":
            # Explicit credentials: uid/gid are the host ids of the container's root,
            # which a receiver in its user namespace sees as 0 (libudev drops others).
            sock.sendmsg([data], [send_credentials(os.getpid(), uid, gid)], 0, (0, UDEV_GROUP))
            return {}
        self._seq += 1
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(data),
            _UEVENT_SEND,
            _NLM_F_REQUEST | _NLM_F_ACK,
            self._seq,
            sock.getsockname()[0],
        )
        # The kernel's rebroadcast keeps the request's credentials, and libudev drops a
        # message whose sender is not uid 0 as the receiver sees it: claim the
        # container root's host ids here too.
        sock.sendmsg([header + data], [send_credentials(os.getpid(), uid, gid)], 0, (0, 0))
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while poller.poll(2000):
            reply = sock.recv(MAX_MESSAGE)
            if len(reply) < _NLMSGHDR.size + 4:
                continue
            _, kind, _, seq, _ = _NLMSGHDR.unpack_from(reply)
            if kind != _NLMSG_ERROR or seq != self._seq:
                continue  # a stale ack from a request that timed out earlier
            code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
            if code:
                raise OSError(code, f"kernel refused the uevent: {os.strerror(code)}")
            return {}
        raise _Failure("invalid", "no ack from the kernel for UEVENT_SEND", path=None)

    def route_socket(self) -> tuple[dict[str, Any], list[int]]:
        if not self.has_net:
            raise _Failure(
                "invalid", "the helper is not in a network namespace of its own", path=None
            )
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        return {}, [sock.detach()]

    def handle(
        self, op: str, args: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        if op == "make_node":
            return self.make_node(**args), []
        if op == "bind_node":
            if len(fds) != 1:
                raise _Failure("invalid", f"bind_node needs one tree fd, got {len(fds)}", path=None)
            return self.bind_node(**args, tree=fds[0]), []
        if op == "make_symlink":
            return self.make_symlink(**args), []
        if op == "remove_node":
            return self.remove_node(**args), []
        if op == "remove_symlink":
            return self.remove_symlink(**args), []
        if op == "exists":
            return self.exists(**args), []
        if op == "send_uevent":
            return self.send_uevent(**args), []
        if op == "route_socket":
            return self.route_socket()
        if op == "ping":
            return {"pid": os.getpid()}, []
        raise _Failure("invalid", f"unknown request {op!r}", path=None)


def _fds_from(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _serve(sock: socket.socket, pidfd: int, inside: _Inside) -> int:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            return 0  # the container's init died: nothing left to serve
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            return 0
        fds = _fds_from(ancdata)
        if not data:
            for fd in fds:
                os.close(fd)
            return 0  # the daemon closed its end
        out_fds: list[int] = []
        try:
            request = json.loads(data)
            op = request.pop("op")
            if op == "stop":
                sock.send(json.dumps({"ok": True, "result": {}}).encode())
                return 0
            if flags & socket.MSG_CTRUNC:
                raise _Failure("invalid", "too many descriptors in one request", path=None)
            result, out_fds = inside.handle(op, request, fds)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except _Failure as failure:
            reply = {"ok": False, "error": failure.to_json()}
        except OSError as exc:
            reply = {
                "ok": False,
                "error": {
                    "kind": "os",
                    "message": exc.strerror or str(exc),
                    "path": exc.filename if isinstance(exc.filename, str) else None,
                    "errno": exc.errno,
                },
            }
        except Exception as exc:  # report it and keep serving: one bad request is not fatal
            reply = {
                "ok": False,
                "error": {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"},
            }
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.sendmsg([json.dumps(reply).encode()], _rights(out_fds))
        finally:
            for fd in out_fds:
                os.close(fd)


def _helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hotrelay.effectors.nshelper")
    parser.add_argument("--container", required=True)
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--pidfd", type=int, required=True)
    parser.add_argument("--root-fd", type=int, required=True)
    parser.add_argument("--mnt-fd", type=int, required=True)
    parser.add_argument("--net-fd", type=int)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    try:
        if args.net_fd is not None:
            ns.join(args.net_fd, "net")
            os.close(args.net_fd)
        ns.join(args.mnt_fd, "mnt")
        os.close(args.mnt_fd)
        # Modes are passed exactly; nothing we create should be masked.
        os.umask(0)
    except OSError as exc:
        sock.send(json.dumps({"ok": False, "error": {"kind": "os", "message": str(exc)}}).encode())
        return 1
    inside = _Inside(args.container, args.root_fd, has_net=args.net_fd is not None)
    sock.send(json.dumps({"ok": True, "result": {"pid": os.getpid()}}).encode())
    return _serve(sock, args.pidfd, inside)


# -- the daemon side (trio) -------------------------------------------------------------


def _helper_env() -> dict[str, str]:
    """The helper runs with cwd "/": make this very package importable there."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_root if not existing else f"{package_root}:{existing}"
    return env


def shares_host_network(container: ContainerRef) -> bool:
    """True if the container lives in the daemon's own network namespace."""
    if container.host_network:
        return True
    inode = container.namespaces.get("net")
    return inode is not None and inode == ns.own_namespace_inode("net")


@dataclass(frozen=True, slots=True)
class _Reply:
    result: dict[str, Any]
    fds: tuple[int, ...]


def _open_container(container: ContainerRef, *, join_net: bool) -> dict[str, int]:
    """pidfd, root, mnt (and net) fds of the container's init, verified race-free."""
    fds: dict[str, int] = {}
    try:
        fds["pidfd"] = ns.open_pidfd(container.pid)
        fds["root"] = ns.open_root(container.pid)
        kinds = ("mnt", "net") if join_net else ("mnt",)
        for kind in kinds:
            fds[kind] = ns.open_namespace(container.pid, kind, container.namespaces.get(kind))
        if (
            container.start_time is not None
            and ns.start_time(container.pid) != container.start_time
        ):
            raise ns.NamespaceChangedError(f"pid {container.pid} is not the container's init")
        # Opened while the pidfd pinned the process: if it is still alive now, all of
        # the above belong to it and not to a process that reused its pid.
        if not ns.is_alive(fds["pidfd"]):
            raise ProcessLookupError(f"pid {container.pid} exited")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


class NamespaceHelper:
    """The daemon's handle on one helper process; requests are serialized."""

    def __init__(
        self,
        container: ContainerRef,
        process: trio.Process,
        sock: trio.socket.SocketType,
        *,
        helper_pid: int,
        joined_net: bool,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.container = container
        self.request_timeout = request_timeout
        self.helper_pid = helper_pid
        self.joined_net = joined_net
        self._process = process
        self._sock = sock
        self._lock = trio.Lock()
        self._broken = False

    @classmethod
    async def start(
        cls,
        container: ContainerRef,
        *,
        start_within: float = DEFAULT_START_TIMEOUT,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> NamespaceHelper:
        """Spawn a helper in the container's mount (and network) namespace."""
        join_net = not shares_host_network(container)
        name = container.target
        try:
            fds = _open_container(container, join_net=join_net)
        except OSError as exc:
            raise HelperError(name, f"cannot open its namespaces: {exc}", errno=exc.errno) from exc
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        argv = [
            sys.executable,
            "-m",
            "hotrelay.effectors.nshelper",
            f"--container={name}",
            f"--socket-fd={theirs.fileno()}",
            f"--pidfd={fds['pidfd']}",
            f"--root-fd={fds['root']}",
            f"--mnt-fd={fds['mnt']}",
            *([f"--net-fd={fds['net']}"] if "net" in fds else []),
        ]
        try:
            process = await trio.lowlevel.open_process(
                argv,
                pass_fds=(theirs.fileno(), *fds.values()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=_helper_env(),
                # A ^C at a terminal must not take helpers down before the daemon
                # has undone what they did.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for fd in fds.values():
                os.close(fd)
        sock = trio.socket.from_stdlib_socket(ours)
        helper = cls(
            container,
            process,
            sock,
            helper_pid=process.pid,
            joined_net=join_net,
            request_timeout=request_timeout,
        )
        try:
            with trio.fail_after(start_within):
                reply = await helper._receive()
        except trio.TooSlowError:
            await helper._kill()
            raise HelperError(
                name, f"namespace helper did not start within {start_within} s"
            ) from None
        except BaseException:
            await helper._kill()
            raise
        if not reply.get("ok"):
            await helper._kill()
            message = reply.get("error", {}).get("message", "unknown error")
            raise HelperError(name, f"namespace helper could not join the container: {message}")
        return helper

    @property
    def alive(self) -> bool:
        return not self._broken and self._process.returncode is None

    async def wait_exited(self) -> int:
        """Wait until the helper exits on its own (socket closed, container gone)."""
        return await self._process.wait()

    async def _receive(self) -> dict[str, Any]:
        data, ancdata, _flags, _ = await self._sock.recvmsg(
            MAX_MESSAGE, _ANCBUF, socket.MSG_CMSG_CLOEXEC
        )
        fds = _fds_from(ancdata)
        if not data:
            for fd in fds:
                os.close(fd)
            self._broken = True
            raise HelperError(
                self.container.target, "namespace helper exited (did the container stop?)"
            )
        reply: dict[str, Any] = json.loads(data)
        reply["fds"] = fds
        return reply

    async def call(
        self,
        op: str,
        *,
        fds: Sequence[int] = (),
        **args: Any,
    ) -> _Reply:
        """One request and its reply. Errors come back as InjectionError subclasses.

        A helper that misses the deadline, breaks the protocol or is cancelled
        mid-request is killed (a late reply must not answer the next request, and
        a stuck filesystem call must not stay stuck); the next get() starts anew.
        """
        name = self.container.target
        async with self._lock:
            if not self.alive:
                raise HelperError(name, "namespace helper is not running")
            message = json.dumps({"op": op, **args}).encode()
            try:
                with trio.fail_after(self.request_timeout):
                    await self._sock.sendmsg([message], _rights(fds))
                    reply = await self._receive()
            except trio.TooSlowError:
                await self._kill()
                raise HelperError(
                    name, f"{op} did not finish within {self.request_timeout} s"
                ) from None
            except ConnectionError as exc:
                await self._kill()
                raise HelperError(
                    name, f"{op}: namespace helper exited (did the container stop?)"
                ) from exc
            except (OSError, ValueError) as exc:
                await self._kill()
                raise HelperError(name, f"{op}: lost the namespace helper: {exc}") from exc
            except BaseException:
                await self._kill()
                raise
        if reply.get("ok"):
            return _Reply(reply.get("result", {}), tuple(reply["fds"]))
        for fd in reply["fds"]:
            os.close(fd)
        error = reply.get("error", {})
        error_class = _ERROR_KINDS.get(error.get("kind", ""), InjectionError)
        raise error_class(
            name, error.get("message", "failed"), path=error.get("path"), errno=error.get("errno")
        )

    async def _kill(self) -> None:
        self._broken = True
        with trio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.kill()
            await self._process.wait()
            self._sock.close()

    async def aclose(self, *, grace: float = 2.0) -> None:
        """Stop and reap the helper: EOF first, SIGKILL if it lingers."""
        self._broken = True
        self._sock.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()

    # -- typed requests ----------------------------------------------------------------

    async def ping(self) -> int:
        reply = await self.call("ping")
        return int(reply.result["pid"])

    async def make_node(
        self,
        path: str,
        *,
        kind: str,
        major: int,
        minor: int,
        mode: int,
        uid: int,
        gid: int,
        dir_uid: int,
        dir_gid: int,
    ) -> Created:
        """mknod at path; uid/gid/dir ids are host ids."""
        reply = await self.call(
            "make_node",
            path=path,
            kind=kind,
            major=major,
            minor=minor,
            mode=mode,
            uid=uid,
            gid=gid,
            dir_uid=dir_uid,
            dir_gid=dir_gid,
        )
        return Created(tuple(reply.result["dirs"]))

    async def bind_node(
        self, path: str, tree: int, *, kind: str, major: int, minor: int, dir_uid: int, dir_gid: int
    ) -> Created:
        """Mount the detached tree (an open_tree fd made on the host) at path."""
        reply = await self.call(
            "bind_node",
            fds=(tree,),
            path=path,
            kind=kind,
            major=major,
            minor=minor,
            dir_uid=dir_uid,
            dir_gid=dir_gid,
        )
        return Created(tuple(reply.result["dirs"]))

    async def make_symlink(self, path: str, target: str, *, dir_uid: int, dir_gid: int) -> Created:
        reply = await self.call(
            "make_symlink", path=path, target=target, dir_uid=dir_uid, dir_gid=dir_gid
        )
        return Created(tuple(reply.result["dirs"]))

    async def remove_node(
        self, path: str, *, kind: str, major: int, minor: int, method: str, dirs: Sequence[str]
    ) -> Removed:
        reply = await self.call(
            "remove_node",
            path=path,
            kind=kind,
            major=major,
            minor=minor,
            method=method,
            dirs=list(dirs),
        )
        return _removed(reply.result)

    async def remove_symlink(self, path: str, target: str, *, dirs: Sequence[str]) -> Removed:
        reply = await self.call("remove_symlink", path=path, target=target, dirs=list(dirs))
        return _removed(reply.result)

    async def exists(self, path: str) -> bool:
        """Whether path exists in the container (symlinks resolved within its root)."""
        reply = await self.call("exists", path=path)
        return bool(reply.result["exists"])

    async def send_uevent(self, wire: str, payload: bytes, *, uid: int, gid: int) -> None:
        """Send a uevent in the container's netns: wire "kernel" (UEVENT_SEND, the kernel
        rebroadcasts it on group 1) or "udev" (group 2, credentials uid/gid)."""
        await self.call("send_uevent", wire=wire, payload=payload.hex(), uid=uid, gid=gid)

    async def route_socket(self) -> socket.socket:
        """A NETLINK_ROUTE socket created inside the container's network namespace."""
        reply = await self.call("route_socket")
        if len(reply.fds) != 1:
            for fd in reply.fds:
                os.close(fd)
            raise HelperError(self.container.target, "route_socket: no socket in the reply")
        return socket.socket(fileno=reply.fds[0])


def _removed(result: dict[str, Any]) -> Removed:
    return Removed(
        removed=tuple(result["removed"]),
        left=tuple((str(path), str(why)) for path, why in result["left"]),
    )


class NamespaceHelpers:
    """One helper per running container: started on first use, restarted after it
    died, replaced when the container restarted, closed (and reaped) on request."""

    def __init__(
        self,
        *,
        start_within: float = DEFAULT_START_TIMEOUT,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._start_within = start_within
        self._request_timeout = request_timeout
        self._helpers: dict[tuple[object, str], NamespaceHelper] = {}
        self._locks: dict[tuple[object, str], trio.Lock] = {}
        self._closed = False

    async def get(self, container: ContainerRef) -> NamespaceHelper:
        if self._closed:
            raise HelperError(container.target, "the namespace helpers are shut down")
        key = container.key
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            helper = self._helpers.get(key)
            if helper is not None and (
                not helper.alive
                or helper.container.pid != container.pid
                or helper.container.start_time != container.start_time
            ):
                del self._helpers[key]
                await helper.aclose()
                helper = None
            if helper is None:
                helper = await NamespaceHelper.start(
                    container,
                    start_within=self._start_within,
                    request_timeout=self._request_timeout,
                )
                self._helpers[key] = helper
            return helper

    def running(self) -> list[NamespaceHelper]:
        return [helper for helper in self._helpers.values() if helper.alive]

    def reap(self) -> int:
        """Forget the helpers that exited on their own (their container died while they
        were idle) and reap them; how many. Without this each stays a zombie holding a
        socket until the daemon exits, one per container that ever stopped."""
        reaped = 0
        for key, helper in list(self._helpers.items()):
            if helper._process.returncode is None:  # reads waitpid(WNOHANG): reaps it
                continue
            del self._helpers[key]
            helper._broken = True
            helper._sock.close()
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
            reaped += 1
        return reaped

    async def reap_forever(self, interval: float = 1.0) -> None:
        """Run :meth:`reap` every ``interval`` seconds, until cancelled."""
        while True:
            await trio.sleep(interval)
            self.reap()

    async def close(self, container: ContainerRef) -> None:
        """The container stopped: stop its helper (no-op if it has none)."""
        helper = self._helpers.pop(container.key, None)
        self._locks.pop(container.key, None)
        if helper is not None:
            await helper.aclose()

    async def aclose(self) -> None:
        self._closed = True
        helpers, self._helpers = list(self._helpers.values()), {}
        for helper in helpers:
            await helper.aclose()

    async def __aenter__(self) -> NamespaceHelpers:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
