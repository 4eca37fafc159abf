"""One helper per container that needs one, forked on demand from one fork server.

The pool starts the fork server (``server``) on first use and again if it died, asks
it for a helper when a container needs one, and closes helpers that have been idle
for ``idle_timeout`` seconds (the next request forks a new one in a few ms), those of
stopped containers, and those that exited on their own.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef
from hotrelay.effectors.nshelper.client import DEFAULT_TIMEOUT, NamespaceHelper, receive_reply
from hotrelay.effectors.nshelper.errors import HelperError, InjectionError
from hotrelay.effectors.nshelper.protocol import Failure, Forked, ForkHelper, ProtocolError, encode
from hotrelay.effectors.nshelper.server import rights
from hotrelay.kernel import mount, ns

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_START_TIMEOUT",
    "ForkServer",
    "NamespaceHelpers",
    "shares_host_network",
]

DEFAULT_START_TIMEOUT = 15.0
DEFAULT_IDLE_TIMEOUT = 30.0
_SERVER_MODULE = "hotrelay.effectors.nshelper.server"


def shares_host_network(container: ContainerRef) -> bool:
    """True if the container lives in the daemon's own network namespace."""
    if container.host_network:
        return True
    inode = container.namespaces.get("net")
    return inode is not None and inode == ns.own_namespace_inode("net")


def _server_env() -> dict[str, str]:
    """The fork server runs with cwd "/": make this very package importable there."""
    package_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_root if not existing else f"{package_root}:{existing}"
    return env


def _open_container(container: ContainerRef, *, join_net: bool) -> list[int]:
    """pidfd, root, mnt (and net) fds of the container's init, verified race-free."""
    fds: list[int] = []
    try:
        pidfd = ns.open_pidfd(container.pid)
        fds.append(pidfd)
        fds.append(ns.open_root(container.pid))
        kinds = ("mnt", "net") if join_net else ("mnt",)
        for kind in kinds:
            fds.append(ns.open_namespace(container.pid, kind, container.namespaces.get(kind)))
        if (
            container.start_time is not None
            and ns.start_time(container.pid) != container.start_time
        ):
            raise ns.NamespaceChangedError(f"pid {container.pid} is not the container's init")
        # Opened while the pidfd pinned the process: if it is still alive now, all of
        # the above belong to it and not to a process that reused its pid.
        if not ns.is_alive(pidfd):
            raise ProcessLookupError(f"pid {container.pid} exited")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class ForkServer:
    """The daemon's handle on the fork server process."""

    def __init__(self, process: trio.Process, sock: trio.socket.SocketType) -> None:
        self._process = process
        self._sock = sock
        self._lock = trio.Lock()

    @classmethod
    async def start(cls) -> ForkServer:
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-B", "-m", _SERVER_MODULE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=_server_env(),
                # A ^C at a terminal must not take helpers down before the daemon
                # has undone what they did.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, trio.socket.from_stdlib_socket(ours))

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.returncode is None

    async def fork(self, request: ForkHelper, fds: list[int]) -> tuple[int, int]:
        """(pid, pidfd) of a new helper."""
        async with self._lock:
            await self._sock.sendmsg([encode(request)], rights(fds))
            received = await receive_reply(self._sock)
        if received is None:
            raise OSError("the fork server exited")
        reply, reply_fds = received
        if isinstance(reply, Forked) and len(reply_fds) == 1:
            return reply.pid, reply_fds[0]
        for fd in reply_fds:
            os.close(fd)
        if isinstance(reply, Failure):
            raise OSError(reply.errno or 0, f"the fork server could not fork: {reply.message}")
        raise ProtocolError(f"unexpected {reply.op} reply from the fork server")

    async def aclose(self, *, grace: float = 2.0) -> None:
        self._sock.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()


_LOOKUP = (
    mount.RESOLVE_BENEATH
    | mount.RESOLVE_NO_SYMLINKS
    | mount.RESOLVE_NO_MAGICLINKS
    | mount.RESOLVE_NO_XDEV
)


@dataclass(slots=True)
class _DevView:
    """The daemon's own view of a container's tmpfs /dev, for cheap existence checks."""

    pid: int
    start_time: int | None
    pidfd: int
    dev_fd: int | None  # None: /dev is not tmpfs; ask the helper

    def close(self) -> None:
        os.close(self.pidfd)
        if self.dev_fd is not None:
            os.close(self.dev_fd)


def _lookup(dev_fd: int, path: str) -> bool | None:
    """Is something at ``path`` (below /dev)? None: the way there leaves the tmpfs.

    Confined to the tmpfs itself (RESOLVE_NO_XDEV): a lookup there never waits on
    userspace, so it runs right in the event loop. A mount on the leaf itself (our
    bind-mounted node, or the container's) is something there, found without looking
    into it; so is a symlink or anything else the container put in the way (never
    overwritten).
    """
    parent_path, _, name = path.removeprefix("/dev/").rpartition("/")
    parent = dev_fd
    try:
        if parent_path:
            parent = mount.openat2(
                dev_fd, parent_path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, resolve=_LOOKUP
            )
    except FileNotFoundError:
        return False
    except OSError as exc:
        return None if exc.errno == errno.EXDEV else True
    try:
        os.close(mount.openat2(parent, name, os.O_PATH | os.O_NOFOLLOW, resolve=_LOOKUP))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # EXDEV: a mount on the leaf; ELOOP: a symlink; ...
    finally:
        if parent != dev_fd:
            os.close(parent)
    return True


class NamespaceHelpers:
    """Helpers by container: forked on first use, again after one died or idled out,
    replaced when the container restarted, closed on request."""

    def __init__(
        self,
        *,
        start_within: float = DEFAULT_START_TIMEOUT,
        request_timeout: float = DEFAULT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self._start_within = start_within
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._helpers: dict[tuple[object, str], NamespaceHelper] = {}
        self._locks: dict[tuple[object, str], trio.Lock] = {}
        self._views: dict[tuple[object, str], _DevView] = {}
        self._server: ForkServer | None = None
        self._server_lock = trio.Lock()
        self._closed = False

    @property
    def fork_server_pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    async def _fork_server(self) -> ForkServer:
        async with self._server_lock:
            if self._server is not None and not self._server.alive:
                await self._server.aclose()
                self._server = None
            if self._server is None:
                self._server = await ForkServer.start()
            return self._server

    async def start(self) -> None:
        """Start the fork server now (else the first request starts it)."""
        await self._fork_server()

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
                await helper.kill()
                if helper.stuck:
                    # One stuck helper per container at most: a container whose files
                    # never answer does not get to park one process after another.
                    raise HelperError(
                        container.target,
                        f"its namespace helper (pid {helper.helper_pid}) is still stuck in "
                        "the container's filesystem (a file that never answers, such as "
                        "one on a hung FUSE mount); not starting another",
                    )
                del self._helpers[key]
                helper.forget()
                helper = None
            if helper is None:
                helper = await self._start(container)
                self._helpers[key] = helper
            return helper

    async def _start(self, container: ContainerRef) -> NamespaceHelper:
        name = container.target
        join_net = not shares_host_network(container)
        try:
            fds = _open_container(container, join_net=join_net)
        except OSError as exc:
            raise HelperError(name, f"cannot open its namespaces: {exc}", errno=exc.errno) from exc
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            server = await self._fork_server()
            with trio.fail_after(self._start_within):
                pid, pidfd = await server.fork(ForkHelper(name, join_net), [theirs.fileno(), *fds])
        except trio.TooSlowError:
            ours.close()
            raise HelperError(name, f"no namespace helper within {self._start_within} s") from None
        except (OSError, ProtocolError) as exc:
            ours.close()
            raise HelperError(name, f"cannot start a namespace helper: {exc}") from exc
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for fd in fds:
                os.close(fd)
        helper = NamespaceHelper(
            container,
            trio.socket.from_stdlib_socket(ours),
            pidfd,
            helper_pid=pid,
            joined_net=join_net,
            request_timeout=self.request_timeout,
        )
        try:
            with trio.fail_after(self._start_within):
                await helper.wait_ready()
        except trio.TooSlowError:
            await helper.kill()
            raise HelperError(
                name, f"namespace helper did not start within {self._start_within} s"
            ) from None
        except BaseException:
            await helper.kill()
            raise
        return helper

    async def node_exists(self, container: ContainerRef, path: str) -> bool:
        """Whether anything is at ``path`` (below /dev) in the container.

        Looked up by the daemon itself in the container's /dev when that is tmpfs (one
        syscall, no helper: the heal pass asks this for every node every few seconds,
        and helpers may then stay closed); by the helper otherwise.
        """
        view = await self._dev_view(container)
        if view is not None and view.dev_fd is not None:
            found = _lookup(view.dev_fd, path)
            if found is not None:
                return found
        helper = await self.get(container)
        return await helper.exists(path)

    async def _dev_view(self, container: ContainerRef) -> _DevView | None:
        key = container.key
        view = self._views.get(key)
        if view is not None:
            if (
                view.pid == container.pid
                and view.start_time == container.start_time
                and ns.is_alive(view.pidfd)
            ):
                return view
            del self._views[key]
            view.close()
        try:
            pidfd = ns.open_pidfd(container.pid)
        except OSError:
            return None
        try:
            if (
                container.start_time is not None
                and ns.start_time(container.pid) != container.start_time
            ):
                os.close(pidfd)
                return None
            helper = await self.get(container)
            try:
                dev_fd: int | None = await helper.dev_directory()
            except HelperError:
                raise
            except InjectionError:
                dev_fd = None  # not tmpfs: the helper answers every time
        except BaseException:
            os.close(pidfd)
            raise
        view = _DevView(container.pid, container.start_time, pidfd, dev_fd)
        self._views[key] = view
        return view

    def running(self) -> list[NamespaceHelper]:
        return [helper for helper in self._helpers.values() if helper.alive]

    def reap(self) -> int:
        """Forget the helpers that exited on their own (their container died while they
        were idle); how many. The fork server's kernel reaps their processes."""
        reaped = 0
        for key, helper in list(self._helpers.items()):
            if not helper.exited:
                continue
            del self._helpers[key]
            helper.forget()
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
            reaped += 1
        for key, view in list(self._views.items()):
            if not ns.is_alive(view.pidfd):
                del self._views[key]
                view.close()
        return reaped

    async def close_idle(self, now: float | None = None) -> int:
        """Close helpers unused for idle_timeout seconds; how many."""
        now = time.monotonic() if now is None else now
        closed = 0
        for key, helper in list(self._helpers.items()):
            lock = self._locks.get(key)
            if helper.busy or (lock is not None and lock.locked()):
                continue
            if now - helper.last_used < self.idle_timeout:
                continue
            if self._helpers.get(key) is helper:
                del self._helpers[key]
                await helper.aclose()
                closed += 1
        return closed

    async def reap_forever(self, interval: float = 1.0) -> None:
        """Reap and close idle helpers every ``interval`` seconds, until cancelled."""
        while True:
            await trio.sleep(interval)
            self.reap()
            await self.close_idle()

    async def close(self, container: ContainerRef) -> None:
        """The container stopped: stop its helper (no-op if it has none)."""
        helper = self._helpers.pop(container.key, None)
        self._locks.pop(container.key, None)
        view = self._views.pop(container.key, None)
        if view is not None:
            view.close()
        if helper is not None:
            await helper.aclose()

    async def aclose(self) -> None:
        self._closed = True
        views, self._views = list(self._views.values()), {}
        for view in views:
            view.close()
        helpers, self._helpers = list(self._helpers.values()), {}
        for helper in helpers:
            await helper.aclose()
        if self._server is not None:
            server, self._server = self._server, None
            await server.aclose()

    async def __aenter__(self) -> NamespaceHelpers:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
