"""The helper processes: a fork server, and the per-container helpers it forks.

The daemon runs trio with worker threads; a multi-threaded process may not join a
mount namespace, and forking one is fragile. So the daemon starts this module once,
``python -m hotrelay.effectors.nshelper.server``, as a fresh single-threaded process
that imports what helpers need, freezes its heap (``gc.freeze``: a forked child then
dirties few pages) and serves ``ForkHelper`` requests on one SOCK_SEQPACKET socket.
For each it forks a helper, which:

- joins the container's network namespace if it has one of its own (sockets it makes
  are then the container's; a network namespace changes no path lookup);
- never joins its mount namespace (see ``confined`` and ``mountns``), nor its user or
  pid namespace: it stays host root with every capability, and takes on the
  container's ids only per operation (setfsuid/setfsgid, SCM_CREDENTIALS);
- serves one request at a time on its own socket, descriptors passed as SCM_RIGHTS
  both ways, and exits when that socket closes, when the container's init dies, or
  when the fork server (its parent) dies (PR_SET_PDEATHSIG).

The fork server ignores SIGCHLD, so the kernel reaps helpers as they exit; the
daemon watches each through a pidfd the fork server opened for it. Every error a
helper meets is caught and answered or ends it with ``os._exit``; SIGINT is ignored
(a ^C at a terminal, ``systemctl kill -s INT``), SIGTERM ends it.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import select
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from hotrelay.effectors.nshelper.confined import Confined, OperationFailed
from hotrelay.effectors.nshelper.protocol import (
    MAX_FDS,
    RECEIVE_BUFFER,
    Failure,
    Forked,
    ForkHelper,
    Pong,
    ProtocolError,
    Reply,
    decode_request,
    encode,
)
from hotrelay.kernel import ns
from hotrelay.kernel.libc import set_parent_death_signal

__all__ = ["ANCILLARY_BUFFER", "fds_from", "main", "rights"]

_INT_SIZE = array.array("i").itemsize
ANCILLARY_BUFFER = socket.CMSG_SPACE(MAX_FDS * _INT_SIZE)


def fds_from(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _send(sock: socket.socket, reply: Reply, fds: Sequence[int] = ()) -> None:
    try:
        data = encode(reply)
    except ProtocolError as exc:
        data, fds = encode(Failure("internal", str(exc)[:200])), ()
    sock.sendmsg([data], rights(fds))


def _receive(sock: socket.socket) -> tuple[bytes, list[int], int] | None:
    """One datagram, its descriptors and flags; None at EOF."""
    data, ancdata, flags, _ = sock.recvmsg(
        RECEIVE_BUFFER, ANCILLARY_BUFFER, socket.MSG_CMSG_CLOEXEC
    )
    fds = fds_from(ancdata)
    if not data:
        _close_all(fds)
        return None
    return data, fds, flags


# -- a helper ----------------------------------------------------------------------------


def _answer(confined: Confined, data: bytes, fds: list[int], flags: int) -> tuple[Reply, list[int]]:
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return Failure("invalid", "request too large or too many descriptors"), []
        return confined.handle(decode_request(data), fds)
    except OperationFailed as failed:
        return failed.failure, []
    except ProtocolError as exc:
        return Failure("invalid", f"bad request: {exc}"), []
    except OSError as exc:
        path = exc.filename if isinstance(exc.filename, str) else None
        return Failure("os", exc.strerror or "failed", path, exc.errno), []
    except Exception as exc:  # one bad request is not fatal to the others
        return Failure("internal", type(exc).__name__), []
    finally:
        _close_all(fds)


def _serve_helper(sock: socket.socket, pidfd: int, confined: Confined) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            return  # the container's init died: nothing left to serve
        received = _receive(sock)
        if received is None:
            return  # the daemon closed its end
        reply, out_fds = _answer(confined, *received)
        try:
            _send(sock, reply, out_fds)
        finally:
            _close_all(out_fds)


def _helper(
    sock: socket.socket, request: ForkHelper, fds: list[int], go: int, parent: int
) -> NoReturn:
    """The forked helper's whole life; it never returns into the fork server's code."""
    status = 1
    try:
        set_parent_death_signal(signal.SIGKILL)
        # The fork server may have died before that took effect; and we wait until
        # it holds our pidfd (EOF instead of the go byte: it could not; give up).
        if os.getppid() != parent or os.read(go, 1) != b"g":
            os._exit(1)
        os.close(go)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its mount children
        sock.close()
        conn = socket.socket(fileno=fds[0])
        pidfd, root_fd, mnt_fd = fds[1], fds[2], fds[3]
        if request.join_net:
            ns.join(fds[4], "net")
            os.close(fds[4])
        # Modes are passed exactly; nothing we create should be masked.
        os.umask(0)
        confined = Confined(
            request.container, root_fd=root_fd, mnt_fd=mnt_fd, has_net=request.join_net
        )
        _send(conn, Pong(os.getpid()))
        _serve_helper(conn, pidfd, confined)
        status = 0
    except BaseException:
        status = 1
    finally:
        os._exit(status)


# -- the fork server ---------------------------------------------------------------------


def _fork_helper(sock: socket.socket, request: ForkHelper, fds: list[int]) -> None:
    expected = 5 if request.join_net else 4
    if len(fds) != expected:
        _send(sock, Failure("invalid", f"fork_helper needs {expected} descriptors"))
        return
    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        _helper(sock, request, fds, go_read, parent)
    os.close(go_read)
    try:
        # SIGCHLD is ignored here, so an exited child is reaped at once and its pid
        # could be reused; the child waits on the pipe until its pidfd is open.
        pidfd = os.pidfd_open(pid)
        os.write(go_write, b"g")
    finally:
        os.close(go_write)
    try:
        _send(sock, Forked(pid), [pidfd])
    finally:
        os.close(pidfd)


def _serve_forks(sock: socket.socket) -> int:
    while True:
        received = _receive(sock)
        if received is None:
            return 0  # the daemon is gone or done
        data, fds, flags = received
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                _send(sock, Failure("invalid", "request too large or too many descriptors"))
                continue
            request = decode_request(data)
            if not isinstance(request, ForkHelper):
                _send(sock, Failure("invalid", f"{request.op} is not for the fork server"))
                continue
            _fork_helper(sock, request, fds)
        except ProtocolError as exc:
            _send(sock, Failure("invalid", f"bad request: {exc}"))
        except OSError as exc:
            _send(sock, Failure("os", exc.strerror or "fork failed", None, exc.errno))
        finally:
            _close_all(fds)


def main(argv: Sequence[str]) -> int:
    """``python -m hotrelay.effectors.nshelper.server SOCKET_FD``."""
    if len(argv) != 1 or not argv[0].isdigit():
        os.write(2, b"usage: python -m hotrelay.effectors.nshelper.server SOCKET_FD\n")
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    sock = socket.socket(fileno=int(argv[0]))
    # Everything a helper needs is imported by now; objects made so far are never
    # collected, so forked helpers share these pages with us instead of copying them.
    gc.freeze()
    try:
        return _serve_forks(sock)
    except OSError:
        return 1  # the daemon went away mid-reply


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
