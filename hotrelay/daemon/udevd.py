"""Who udevd is, so that only udevd is believed on the udev netlink group.

Any uid-0 process with CAP_NET_ADMIN in the host's network namespace (a
``--net=host --cap-add NET_ADMIN`` container) may multicast to group 2, so uid 0 alone
proves nothing. What such a process cannot fake is the pid in its SCM_CREDENTIALS:
the kernel fills it in, and claiming another pid needs CAP_SYS_ADMIN. So udevd is
recognised by its pid, learned from the peer of its control socket
(``/run/udev/control``, which only root can create: ``/run/udev`` is root's).

udevd's manager and its workers both send: each worker broadcasts the event it
processed, the manager broadcasts events whose worker failed. Workers are the manager's
direct children (forked once, no second fork), so a sender is udevd when its pid is the
manager's or its parent is the manager. The programs udev rules RUN are the workers'
children, not the manager's.

The manager is held by a pidfd: when it exits (a restart) the identity is forgotten
and learned again, at most every ``RELEARN_INTERVAL`` seconds, from whatever listens
on the control socket then. Costs: a pidfd poll per received batch; per message a
dict lookup for the manager and for workers seen before (whose pidfds are polled
too), one read of ``/proc/PID/stat`` for a worker not seen before.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RELEARN_INTERVAL", "UdevdIdentity", "parent_pid"]

log = logging.getLogger("hotrelay")

RELEARN_INTERVAL = 0.1
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_UCRED = struct.Struct("=iII")
# udevd forks a handful of workers (children_max, 8 + 2 per CPU by default).
MAX_WORKERS = 256


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc/PID/stat, or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    fields = data[data.rfind(b")") + 2 :].split(b" ", 2)
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


class _Process:
    """A pid held by a pidfd: ``alive`` stays true only for that very process."""

    __slots__ = ("_poll", "fd", "pid")

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(cls, pid: int) -> _Process | None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        return cls(pid, fd)

    def alive(self) -> bool:
        return not self._poll.poll(0)  # a pidfd turns readable when its process exits

    def close(self) -> None:
        os.close(self.fd)


def _peer(path: Path) -> tuple[int, int, int | None]:
    """(pid, uid, pidfd or None) of the process listening on the unix socket ``path``."""
    last: OSError | None = None
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):  # udevd's is SEQPACKET
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno == errno.EPROTOTYPE:
                continue
            raise
        with sock:
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            try:
                pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
            except OSError:
                pidfd = None  # before Linux 6.5
            return pid, uid, pidfd
    assert last is not None
    raise last


class UdevdIdentity:
    """Recognises udevd (manager and workers) by the pid a message was sent from."""

    def __init__(
        self,
        control: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        parent_of: Callable[[int], int | None] = parent_pid,
    ) -> None:
        self.control = control
        self._clock = clock
        self._parent_of = parent_of
        self._manager: _Process | None = None
        self._workers: dict[int, _Process] = {}
        self._next_attempt = 0.0
        self.problem: str | None = None  # why udevd is not known, for the drop reason
        self.learned = 0  # how many times udevd was (re)learned
        self.learn()

    @property
    def pid(self) -> int | None:
        return None if self._manager is None else self._manager.pid

    def close(self) -> None:
        self._forget()

    def _forget(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def learn(self) -> bool:
        """Ask the control socket who listens on it; True if udevd is known now."""
        self._next_attempt = self._clock() + RELEARN_INTERVAL
        self._forget()
        try:
            pid, uid, pidfd = _peer(self.control)
        except OSError as exc:
            self.problem = f"udevd is not known (its control socket {self.control}: {exc.strerror})"
            return False
        if uid != 0:
            if pidfd is not None:
                os.close(pidfd)
            self.problem = f"{self.control} is served by uid {uid}, not root"
            return False
        manager = _Process(pid, pidfd) if pidfd is not None else _Process.open(pid)
        if manager is None or not manager.alive():
            if manager is not None:
                manager.close()
            self.problem = f"udevd (pid {pid}, {self.control}) exited"
            return False
        self._manager = manager
        self.problem = None
        self.learned += 1
        log.info("udev source: udevd is pid %d (peer of %s)", pid, self.control)
        return True

    def revalidate(self) -> None:
        """Once per batch: forget udevd if it exited, so that its successor is learned."""
        manager = self._manager
        if manager is not None and not manager.alive():
            log.warning("udev source: udevd (pid %d) exited; learning its successor", manager.pid)
            self._forget()
            self.problem = f"udevd (pid {manager.pid}) exited"
            self._next_attempt = 0.0

    def untrusted_because(self, pid: int | None) -> str | None:
        """None if ``pid`` is udevd's manager or one of its workers, else why not."""
        if pid is None:
            return "no SCM_CREDENTIALS"
        manager = self._manager
        if manager is None:
            if self._clock() < self._next_attempt or not self.learn():
                return self.problem
            manager = self._manager
            assert manager is not None
        if pid == manager.pid:
            return None
        worker = self._workers.get(pid)
        if worker is not None:
            if worker.alive():
                return None
            worker.close()
            del self._workers[pid]
        if self._parent_of(pid) != manager.pid:
            return f"sender pid {pid} is not udevd (pid {manager.pid}) nor one of its workers"
        worker = _Process.open(pid)
        # Its parent is read again now that the pidfd pins the process: the pid may
        # have been reused in between.
        if worker is None or self._parent_of(pid) != manager.pid:
            if worker is not None:
                worker.close()
            return f"sender pid {pid} is not udevd (pid {manager.pid}) nor one of its workers"
        if len(self._workers) >= MAX_WORKERS:
            for old in self._workers.values():
                old.close()
            self._workers.clear()
        self._workers[pid] = worker
        return None
