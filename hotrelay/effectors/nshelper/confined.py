"""What a helper does for its container, from outside the container's mount namespace.

The helper holds the container's root directory (opened through /proc/PID/root while
a pidfd pinned its init) and works relative to it: every path inside the container
is resolved component by component with openat2(RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH), and every change is made relative to the
directory fd that walk produced (mknodat, mkdirat, symlinkat, unlinkat, and
move_mount onto the fd of the file we just created). Lookups from that fd cross the
container's own mounts (its /dev tmpfs), so nothing needs the container's mount
namespace, except attaching and detaching a mount, which ``mountns`` does in a
sealed child. The helper's own file opens (imports, tracebacks) therefore resolve on
the host, where the container can plant nothing.

A symlink planted anywhere on the way is refused, never followed, so the helper can
only ever write inside the container's own /dev. Replies quote what the container
put in the way only through ``protocol.quote`` and list a bounded number of paths.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import select
import socket
import stat
import struct
from collections.abc import Iterator, Sequence

from hotrelay.effectors.nshelper import mountns
from hotrelay.effectors.nshelper.protocol import (
    LEFT_LIMIT,
    PATH_LIMIT,
    AccountTexts,
    BindNode,
    Created,
    DevDirectory,
    Directory,
    Existence,
    Exists,
    Failure,
    MakeNode,
    MakeSymlink,
    Ping,
    Pong,
    ReadAccounts,
    Removed,
    RemoveNode,
    RemoveSymlink,
    Reply,
    Request,
    RouteSocket,
    SendUevent,
    Sent,
    Socket,
    quote,
)
from hotrelay.effectors.nshelper.rootfiles import (
    ACCOUNT_FILES,
    AccountFileError,
    read_account_file,
)
from hotrelay.kernel import mount
from hotrelay.kernel.netlink import NETLINK_KOBJECT_UEVENT, UDEV_GROUP, send_credentials

__all__ = ["Confined", "OperationFailed", "split_dev_path"]

_NO_LINKS = mount.RESOLVE_NO_SYMLINKS | mount.RESOLVE_NO_MAGICLINKS | mount.RESOLVE_BENEATH
_NAME_MAX = 255
# What a uevent socket needs from a kernel ack: nlmsghdr + the error code.
_NLMSGHDR = struct.Struct("=IHHII")
_NLMSG_ERROR = 0x2
_UEVENT_SEND = 0x10  # any type >= NLMSG_MIN_TYPE reaches uevent_net_rcv_skb()
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NETLINK_ROUTE = 0
_ACK_BUFFER = 8192
# A mount operation's child gets this long; the daemon's own deadline is longer.
MOUNT_TIMEOUT = 3.0


class OperationFailed(Exception):
    """An expected failure, reported to the daemon as a protocol ``Failure``."""

    def __init__(self, kind: str, message: str, *, path: str | None, errno: int | None = None):
        super().__init__(message)
        self.failure = Failure(kind, message, _shown(path), errno)


def _shown(path: str | None) -> str | None:
    """A path for a reply: our own paths, but capped all the same."""
    if path is None or len(path) <= PATH_LIMIT:
        return path
    return path[:PATH_LIMIT] + "..."


def split_dev_path(path: str) -> tuple[str, ...]:
    """'/dev/a/b' -> ('dev', 'a', 'b'); ValueError for anything not plainly below /dev.

    No '.', '..' or empty components, no NUL: the path is used component by
    component, so it must say exactly which names to walk.
    """
    if not isinstance(path, str) or not path.startswith("/dev/"):
        raise ValueError(f"{quote(str(path))} is not an absolute path below /dev")
    parts = tuple(path.split("/")[1:])
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise ValueError(f"{quote(path)} has an empty, '.' or '..' component (or a NUL)")
        if len(os.fsencode(part)) > _NAME_MAX:
            raise ValueError(f"{quote(path)}: component {quote(part)} is too long")
    return parts


def _describe(st: os.stat_result, link: str | None = None) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return f"a symlink to {quote(link)}" if link is not None else "a symlink"
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


def _removed(removed: Sequence[str], left: Sequence[tuple[str, str]]) -> Removed:
    shown_left = tuple((_shown(path) or "", why) for path, why in left[:LEFT_LIMIT])
    return Removed(
        removed=tuple(_shown(path) or "" for path in removed[:LEFT_LIMIT]),
        left=shown_left,
        more_left=max(0, len(left) - LEFT_LIMIT),
    )


class Confined:
    """The helper's operations on one container, through its root fd."""

    def __init__(self, container: str, *, root_fd: int, mnt_fd: int, has_net: bool) -> None:
        self.container = container
        self.root_fd = root_fd
        self.mnt_fd = mnt_fd
        self.has_net = has_net
        self._empty_root = -1
        self._uevent_sock: socket.socket | None = None
        self._seq = 0

    def handle(self, request: Request, fds: Sequence[int]) -> tuple[Reply, list[int]]:
        """Serve one request; OperationFailed and OSError are the expected failures."""
        if isinstance(request, Ping):
            return Pong(os.getpid()), []
        if isinstance(request, MakeNode):
            return self.make_node(request), []
        if isinstance(request, BindNode):
            if len(fds) != 1:
                raise OperationFailed(
                    "invalid", f"bind_node needs one tree fd, got {len(fds)}", path=None
                )
            return self.bind_node(request, fds[0]), []
        if isinstance(request, MakeSymlink):
            return self.make_symlink(request), []
        if isinstance(request, RemoveNode):
            return self.remove_node(request), []
        if isinstance(request, RemoveSymlink):
            return self.remove_symlink(request), []
        if isinstance(request, Exists):
            return self.exists(request.path), []
        if isinstance(request, SendUevent):
            return self.send_uevent(request), []
        if isinstance(request, RouteSocket):
            return Socket(), [self.route_socket()]
        if isinstance(request, DevDirectory):
            return Directory(), [self.dev_directory()]
        if isinstance(request, ReadAccounts):
            return self.read_accounts()
        raise OperationFailed("invalid", f"{request.op} is not for a helper", path=None)

    # -- walking ------------------------------------------------------------------------

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
                raise OperationFailed(
                    "unsafe",
                    f"{shown} is {_describe(st, _readlink(parent, name))}; refusing to follow it",
                    path=path,
                ) from None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise OperationFailed(
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
            raise OperationFailed("unsafe", str(exc), path=path) from None
        if len(parts) < 2:
            raise OperationFailed("unsafe", "names /dev itself", path=path)
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
                        raise OperationFailed(
                            "invalid", "the container has no /dev", path=path
                        ) from None
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
            except OperationFailed as failed:
                left.append((shown, failed.failure.message))
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
            raise OperationFailed(
                "exists",
                f"already exists as {_describe(st, _readlink(parent, name))}, "
                "not created by hotrelay; left alone",
                path=path,
            )

    def _empty(self) -> int:
        if self._empty_root < 0:
            self._empty_root = mountns.empty_root()
        return self._empty_root

    # -- operations ---------------------------------------------------------------------

    def make_node(self, request: MakeNode) -> Created:
        """mknod at path (privileged containers: their /dev honours device nodes)."""
        path, kind, major, minor = request.path, request.kind, request.major, request.minor
        fmt = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
        parent, name, created = self._walk(path, create=(request.dir_uid, request.dir_gid))
        made = False
        try:
            self._refuse_existing(parent, name, path)
            try:
                # The helper's umask is 0, so mode is exact; mknodat never follows.
                os.mknod(
                    name, fmt | (request.mode & 0o7777), os.makedev(major, minor), dir_fd=parent
                )
            except FileExistsError:
                self._refuse_existing(parent, name, path)
                raise
            made = True
            # chown through an O_PATH fd of the node itself: a rename racing us in the
            # container can at worst make us chown our own node somewhere else.
            node = mount.openat2(parent, name, os.O_PATH | os.O_NOFOLLOW, resolve=_NO_LINKS)
            try:
                if not _is_device(os.fstat(node), kind, major, minor):
                    raise OperationFailed("exists", "was replaced while being created", path=path)
                mount.fchownat_empty(node, request.uid, request.gid)
            finally:
                os.close(node)
        except BaseException:
            if made and _is_device(_lstat(parent, name), kind, major, minor):
                os.unlink(name, dir_fd=parent)
            self._remove_dirs(created)
            raise
        finally:
            os.close(parent)
        return Created(tuple(created))

    def bind_node(self, request: BindNode, tree: int) -> Created:
        """Mount the detached node ``tree`` (made and owned on the host) onto a new empty
        file at path: for /dev filesystems that refuse device nodes (user namespaces)."""
        path = request.path
        parent, name, created = self._walk(path, create=(request.dir_uid, request.dir_gid))
        placeholder = -1
        try:
            self._refuse_existing(parent, name, path)
            with _as_ids(request.dir_uid, request.dir_gid):
                placeholder = os.open(
                    name,
                    os.O_CREAT | os.O_EXCL | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0,
                    dir_fd=parent,
                )
            mountns.attach_node(self.mnt_fd, self._empty(), tree, placeholder, MOUNT_TIMEOUT)
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
        return Created(tuple(created))

    def make_symlink(self, request: MakeSymlink) -> Created:
        path = request.path
        parent, name, created = self._walk(path, create=(request.dir_uid, request.dir_gid))
        try:
            self._refuse_existing(parent, name, path)
            with _as_ids(request.dir_uid, request.dir_gid):
                os.symlink(request.target, name, dir_fd=parent)
        except BaseException:
            self._remove_dirs(created)
            raise
        finally:
            os.close(parent)
        return Created(tuple(created))

    @contextlib.contextmanager
    def _parent_of(
        self, path: str, left: list[tuple[str, str]]
    ) -> Iterator[tuple[int, str] | None]:
        """The parent directory fd of path and the leaf name, closed afterwards; None if
        it is gone (so is everything below it) or unsafe to walk (said in ``left``)."""
        try:
            parent, name, _ = self._walk(path, create=None)
        except FileNotFoundError:
            yield None
            return
        except OperationFailed as failed:
            left.append((path, failed.failure.message))
            yield None
            return
        try:
            yield parent, name
        finally:
            os.close(parent)

    def remove_node(self, request: RemoveNode) -> Removed:
        removed: list[str] = []
        left: list[tuple[str, str]] = []
        with self._parent_of(request.path, left) as opened:
            if opened is not None:
                self._remove_leaf_node(*opened, request, removed, left)
        left += self._remove_dirs(request.dirs)
        return _removed(removed, left)

    def _remove_leaf_node(
        self,
        parent: int,
        name: str,
        request: RemoveNode,
        removed: list[str],
        left: list[tuple[str, str]],
    ) -> None:
        path, kind, major, minor = request.path, request.kind, request.major, request.minor
        st = _lstat(parent, name)
        if st is None:
            return
        if request.method == "bind":
            if _is_device(st, kind, major, minor):
                mountns.detach_node(self.mnt_fd, self._empty(), parent, name, MOUNT_TIMEOUT)
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

    def remove_symlink(self, request: RemoveSymlink) -> Removed:
        removed: list[str] = []
        left: list[tuple[str, str]] = []
        with self._parent_of(request.path, left) as opened:
            if opened is not None:
                parent, name = opened
                st = _lstat(parent, name)
                link = _readlink(parent, name)
                if st is not None and stat.S_ISLNK(st.st_mode) and link == request.target:
                    os.unlink(name, dir_fd=parent)
                    removed.append(request.path)
                elif st is not None:
                    left.append((request.path, f"is now {_describe(st, link)}; left alone"))
        left += self._remove_dirs(request.dirs)
        return _removed(removed, left)

    def exists(self, path: str) -> Existence:
        """Whether path exists in the container, symlinks resolved inside its root."""
        if not path.startswith("/"):
            raise OperationFailed("invalid", "not an absolute path", path=path)
        try:
            fd = mount.openat2(
                self.root_fd,
                path.lstrip("/"),
                os.O_PATH,
                resolve=mount.RESOLVE_IN_ROOT | mount.RESOLVE_NO_MAGICLINKS,
            )
        except OSError:
            return Existence(False)
        os.close(fd)
        return Existence(True)

    def dev_directory(self) -> int:
        """An O_PATH fd of the container's /dev, only if it is tmpfs (or ramfs)."""
        fd = mount.openat2(
            self.root_fd, "dev", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, resolve=_NO_LINKS
        )
        try:
            kind = mount.fs_type(fd)
            if kind not in (mount.TMPFS_MAGIC, mount.RAMFS_MAGIC):
                raise OperationFailed(
                    "invalid", f"/dev is not tmpfs (filesystem type {kind:#x})", path="/dev"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_accounts(self) -> tuple[AccountTexts, list[int]]:
        """/etc/passwd and /etc/group, handed back in a memfd (they may exceed a message)."""
        try:
            texts = [read_account_file(self.root_fd, path).encode() for path in ACCOUNT_FILES]
        except AccountFileError as exc:
            raise OperationFailed("account", str(exc)[:1000], path=None) from None
        memfd = os.memfd_create("hotrelay-accounts", os.MFD_CLOEXEC)
        try:
            for text in texts:
                view = memoryview(text)
                while view:
                    view = view[os.write(memfd, view) :]
            os.lseek(memfd, 0, os.SEEK_SET)
        except BaseException:
            os.close(memfd)
            raise
        return AccountTexts(len(texts[0]), len(texts[1])), [memfd]

    def _need_net(self) -> None:
        if not self.has_net:
            raise OperationFailed(
                "invalid", "the helper is not in a network namespace of its own", path=None
            )

    def _uevent_socket(self) -> socket.socket:
        self._need_net()
        if self._uevent_sock is None:
            # Created after setns(net): the socket lives in the container's netns.
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
            )
            try:
                sock.bind((0, 0))
                # Connected to the kernel (port 0): the kernel refuses unicast from any
                # other sender (ECONNREFUSED to them), so the container cannot feed us
                # "acks". Each reply's sender is checked as well.
                sock.connect((0, 0))
            except BaseException:
                sock.close()
                raise
            self._uevent_sock = sock
        return self._uevent_sock

    def send_uevent(self, request: SendUevent) -> Sent:
        try:
            data = bytes.fromhex(request.payload)
        except ValueError:
            raise OperationFailed("invalid", "payload is not hex", path=None) from None
        sock = self._uevent_socket()
        credentials = [send_credentials(os.getpid(), request.uid, request.gid)]
        if request.wire == "udev":
            # Explicit credentials: uid/gid are the host ids of the container's root,
            # which a receiver in its user namespace sees as 0 (libudev drops others).
            sock.sendmsg([data], credentials, 0, (0, UDEV_GROUP))
            return Sent()
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
        sock.sendmsg([header + data], credentials, 0, (0, 0))
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while poller.poll(2000):
            reply, sender = sock.recvfrom(_ACK_BUFFER)
            if sender[0] != 0 or len(reply) < _NLMSGHDR.size + 4:
                continue  # only the kernel (port 0) answers for itself
            _, kind, _, seq, _ = _NLMSGHDR.unpack_from(reply)
            if kind != _NLMSG_ERROR or seq != self._seq:
                continue  # a stale ack from a request that timed out earlier
            code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
            if code:
                raise OSError(code, f"kernel refused the uevent: {os.strerror(code)}")
            return Sent()
        raise OperationFailed("invalid", "no ack from the kernel for UEVENT_SEND", path=None)

    def route_socket(self) -> int:
        self._need_net()
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_ROUTE
        )
        return sock.detach()
