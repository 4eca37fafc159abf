"""Act and observe from inside a sandbox, without running Python as the mapped root.

Every helper here starts ``python -m hotrelay.testing.inside`` as host root. That
process imports all it needs while still on the host, joins the sandbox's cgroups
(host cgroupfs files are not writable once it is the mapped root), enters the
network namespace (so a listener socket can still get a big SO_RCVBUFFORCE buffer,
which needs CAP_NET_ADMIN in the initial user namespace), then the user namespace
and the rest, becomes uid/gid 0 of the user namespace, and forks so the worker is
inside the pid namespace too (pids in credentials and /proc/self make sense there).
The worker writes JSON lines on stdout; the outer process exits with its status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn

from hotrelay.kernel import libc
from hotrelay.testing.sandbox import Sandbox, helper_argv, helper_env

NETLINK_KOBJECT_UEVENT = 15
GROUP_KERNEL = 1
GROUP_UDEV = 2
# netlink_rcv_skb() hands messages of any type >= NLMSG_MIN_TYPE to the uevent socket.
UEVENT_SEND = 0x10
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
SCM_CREDENTIALS = 2
UCRED = struct.Struct("=iII")
NLMSGHDR = struct.Struct("=IHHII")
LIBUDEV_MAGIC = b"libudev\0"
# Kernel uevents stay under 8 KiB, libudev ones too; MSG_TRUNC would tell otherwise.
RECV_SIZE = 64 * 1024

# Order matters: net before user (see module docstring); mnt last, since it swaps
# /proc under our feet.
_NAMESPACES = (
    ("uts", libc.CLONE_NEWUTS),
    ("ipc", libc.CLONE_NEWIPC),
    ("pid", libc.CLONE_NEWPID),
    ("mnt", libc.CLONE_NEWNS),
)


class InsideError(RuntimeError):
    """A helper acting inside a sandbox failed."""


@dataclasses.dataclass(frozen=True)
class InsideStat:
    """The part of os.stat_result a test cares about, as seen inside the sandbox."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_ino: int
    st_dev: int
    st_size: int


@dataclasses.dataclass(frozen=True)
class UeventMessage:
    """One datagram from a NETLINK_KOBJECT_UEVENT socket, with who sent it."""

    raw: bytes
    port: int  # sender's netlink port id: 0 for the kernel
    groups: int
    pid: int | None  # SCM_CREDENTIALS, as the receiver sees them
    uid: int | None
    gid: int | None
    truncated: bool = False

    @property
    def is_libudev(self) -> bool:
        return self.raw.startswith(LIBUDEV_MAGIC)

    @property
    def header(self) -> str:
        """ "action@devpath" for kernel messages, "libudev" for udev ones."""
        return self.raw.split(b"\0", 1)[0].decode(errors="replace")

    @property
    def env(self) -> dict[str, str]:
        """KEY=VALUE properties; just enough parsing for tests, not the real parser."""
        body = self.raw
        if self.is_libudev:
            offset, length = struct.unpack_from("=II", body, 16)
            body = body[offset : offset + length]
        else:
            body = body.split(b"\0", 1)[1] if b"\0" in body else b""
        env: dict[str, str] = {}
        for field in body.split(b"\0"):
            key, sep, value = field.partition(b"=")
            if sep:
                env[key.decode(errors="replace")] = value.decode(errors="replace")
        return env

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> UeventMessage:
        return cls(
            raw=bytes.fromhex(record["hex"]),
            port=record["port"],
            groups=record["groups"],
            pid=record["pid"],
            uid=record["uid"],
            gid=record["gid"],
            truncated=record["truncated"],
        )


@dataclasses.dataclass(frozen=True)
class SentUevent:
    """What send_uevent_inside() did: the sender's port id and pid (inside view), and
    for via="kernel" the errno from the kernel's ack (0 = rebroadcast)."""

    port: int
    pid: int
    error: int


# -- test side ----------------------------------------------------------------------


def _spec(sandbox: Sandbox | None, action: str, **params: Any) -> list[str]:
    spec: dict[str, Any] = {"action": action, **params}
    if sandbox is not None:
        spec.update(
            pid=sandbox.pid,
            userns=sandbox.userns is not None,
            cgroups=[str(cg) for cg in sandbox.cgroups],
        )
    return helper_argv("hotrelay.testing.inside", json.dumps(spec))


def _run(argv: list[str], timeout: float) -> dict[str, Any]:
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd="/",
        env=helper_env(),
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    if result.returncode != 0 or not lines:
        raise InsideError(
            f"inside helper failed (status {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def stat_inside(
    sandbox: Sandbox, path: str, *, follow_symlinks: bool = True, timeout: float = 30.0
) -> InsideStat:
    """stat() done by the sandbox's root: uid/gid as mapped inside, or the OSError it got."""
    record = _run(_spec(sandbox, "stat", path=path, follow_symlinks=follow_symlinks), timeout)
    if record["errno"]:
        raise OSError(record["errno"], os.strerror(record["errno"]), path)
    return InsideStat(**record["stat"])


def open_inside(
    sandbox: Sandbox, path: str, flags: int = os.O_RDONLY, read: int = 0, *, timeout: float = 30.0
) -> int:
    """open() (then read(read) bytes) by the sandbox's root in its namespaces and
    cgroups: 0 on success, else the errno (EPERM from the device cgroup, EACCES...)."""
    record = _run(_spec(sandbox, "open", path=path, flags=flags, read=read), timeout)
    result: int = record["errno"]
    return result


def send_uevent_inside(
    sandbox: Sandbox | None,
    payload: bytes,
    *,
    via: Literal["multicast", "kernel"] = "multicast",
    group: int = GROUP_KERNEL,
    timeout: float = 30.0,
) -> SentUevent:
    """Send payload on a NETLINK_KOBJECT_UEVENT socket inside the sandbox's netns.

    "multicast" sends it straight to group; "kernel" hands it to the kernel
    (UEVENT_SEND), which rebroadcasts it on group 1 of that netns as a kernel
    message (port 0, SEQNUM appended). sandbox None sends in the host's netns.
    """
    record = _run(_spec(sandbox, "send", hex=payload.hex(), via=via, group=group), timeout)
    return SentUevent(port=record["port"], pid=record["pid"], error=record["errno"])


class UeventListener:
    """A raw NETLINK_KOBJECT_UEVENT listener running in the background inside a
    sandbox (or on the host, with sandbox None) as that sandbox's root."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self._proc = proc
        self.port = port
        self._buffer = b""
        self._messages: list[UeventMessage] = []
        self.errors: list[int] = []

    @classmethod
    def start(
        cls,
        sandbox: Sandbox | None,
        *,
        group: int = GROUP_KERNEL,
        rcvbuf: int = 64 * 1024 * 1024,
        timeout: float = 10.0,
    ) -> UeventListener:
        """Start listening; returns once the socket is bound, so nothing sent after
        this returns can be missed."""
        proc = subprocess.Popen(
            _spec(sandbox, "listen", group=group, rcvbuf=rcvbuf),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            cwd="/",
            env=helper_env(),
        )
        if sandbox is not None:
            sandbox.adopt(proc)
        assert proc.stdout is not None
        # A stalled reader must show up as ENOBUFS in the listener, not block it on a
        # small pipe while the test is busy elsewhere.
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1024 * 1024)
        listener = cls(proc, port=0)
        try:
            ready = listener._next_record(time.monotonic() + timeout)
            if ready is None or "ready" not in ready:
                raise InsideError(f"uevent listener did not start (status {proc.poll()})")
            listener.port = ready["port"]
        except BaseException:
            listener.close()
            raise
        return listener

    def _next_record(self, deadline: float) -> dict[str, Any] | None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                raise InsideError(f"uevent listener exited (status {self._proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        record: dict[str, Any] = json.loads(line)
        return record

    def messages(
        self,
        *,
        timeout: float = 1.0,
        until: Callable[[UeventMessage], bool] | None = None,
    ) -> list[UeventMessage]:
        """Everything received since start. Waits until a message matching until
        has arrived (returning early) or timeout passes."""
        if until is not None and any(until(message) for message in self._messages):
            return list(self._messages)
        deadline = time.monotonic() + timeout
        while (record := self._next_record(deadline)) is not None:
            if "error" in record:
                self.errors.append(record["error"])
                continue
            message = UeventMessage.from_json(record)
            self._messages.append(message)
            if until is not None and until(message):
                break
        return list(self._messages)

    def wait_for(
        self, predicate: Callable[[UeventMessage], bool], *, timeout: float = 5.0
    ) -> UeventMessage:
        """The first message matching predicate; TimeoutError if none arrives."""
        for message in self.messages(timeout=timeout, until=predicate):
            if predicate(message):
                return message
        raise TimeoutError(f"no matching uevent within {timeout} s (listener port {self.port})")

    def close(self) -> None:
        if self._proc.poll() is None:
            # SIGTERM, not SIGKILL: the helper then kills and reaps its worker itself.
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> UeventListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- helper side --------------------------------------------------------------------


def _emit(record: Mapping[str, Any]) -> None:
    os.write(1, (json.dumps(record) + "\n").encode())


def _enter(spec: Mapping[str, Any]) -> socket.socket | None:
    """Join the sandbox (see module docstring), returning the listener socket if any."""
    pid = spec["pid"]
    ns_fds = {
        kind: os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        for kind in ("user", "net", "uts", "ipc", "pid", "mnt")
    }
    for cgroup in spec["cgroups"]:
        fd = os.open(Path(cgroup) / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    libc.setns(ns_fds["net"], libc.CLONE_NEWNET)
    sock = _listener_socket(spec) if spec["action"] == "listen" else None
    if spec["userns"]:
        libc.setns(ns_fds["user"], libc.CLONE_NEWUSER)
    for kind, nstype in _NAMESPACES:
        libc.setns(ns_fds[kind], nstype)
    for fd in ns_fds.values():
        os.close(fd)
    if spec["userns"]:
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    return sock


def _listener_socket(spec: Mapping[str, Any]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, spec["rcvbuf"])  # SO_RCVBUFFORCE
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec["rcvbuf"])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return sock


def _do_stat(spec: Mapping[str, Any]) -> None:
    try:
        st = os.stat(spec["path"], follow_symlinks=spec["follow_symlinks"])
    except OSError as exc:
        _emit({"errno": exc.errno, "stat": None})
        return
    fields = {field.name: getattr(st, field.name) for field in dataclasses.fields(InsideStat)}
    _emit({"errno": 0, "stat": fields})


def _do_open(spec: Mapping[str, Any]) -> None:
    try:
        fd = os.open(spec["path"], spec["flags"] | os.O_CLOEXEC)
        try:
            if spec["read"]:
                os.read(fd, spec["read"])
        finally:
            os.close(fd)
    except OSError as exc:
        _emit({"errno": exc.errno})
        return
    _emit({"errno": 0})


def _do_send(spec: Mapping[str, Any]) -> None:
    payload = bytes.fromhex(spec["hex"])
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT) as sock:
        sock.bind((0, 0))
        port = sock.getsockname()[0]
        error = 0
        if spec["via"] == "kernel":
            header = NLMSGHDR.pack(
                NLMSGHDR.size + len(payload), UEVENT_SEND, NLM_F_REQUEST | NLM_F_ACK, 1, port
            )
            sock.sendto(header + payload, (0, 0))
            sock.settimeout(5)
            reply = sock.recv(65536)
            _, msg_type, _, _, _ = NLMSGHDR.unpack_from(reply)
            if msg_type == NLMSG_ERROR:
                error = -struct.unpack_from("=i", reply, NLMSGHDR.size)[0]
        else:
            sock.sendto(payload, (0, spec["group"]))
    _emit({"port": port, "pid": os.getpid(), "errno": error})


def _do_listen(spec: Mapping[str, Any], sock: socket.socket) -> NoReturn:
    sock.bind((0, spec["group"]))
    _emit({"ready": True, "port": sock.getsockname()[0]})
    ancillary = socket.CMSG_SPACE(UCRED.size)
    while True:
        try:
            data, ancdata, flags, address = sock.recvmsg(RECV_SIZE, ancillary)
        except OSError as exc:
            # ENOBUFS: the kernel dropped messages; report it and keep listening.
            _emit({"error": exc.errno})
            continue
        pid = uid = gid = None
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid, uid, gid = UCRED.unpack(value[: UCRED.size])
        _emit(
            {
                "hex": data.hex(),
                "port": address[0],
                "groups": address[1],
                "pid": pid,
                "uid": uid,
                "gid": gid,
                "truncated": bool(flags & socket.MSG_TRUNC),
            }
        )


def _work(spec: Mapping[str, Any], sock: socket.socket | None) -> None:
    action = spec["action"]
    if action == "stat":
        _do_stat(spec)
    elif action == "open":
        _do_open(spec)
    elif action == "send":
        _do_send(spec)
    elif action == "listen":
        assert sock is not None
        _do_listen(spec, sock)
    else:
        raise ValueError(f"unknown action {action!r}")


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    inside = "pid" in spec
    sock = _enter(spec) if inside else None
    if sock is None and spec["action"] == "listen":
        sock = _listener_socket(spec)
    parent = os.getpid()

    def stop_worker(signum: int, frame: object) -> None:
        os.kill(child, signal.SIGKILL)

    # Installed before the fork, so once the worker has said anything the test side
    # can SIGTERM us and still have the worker killed and reaped, never orphaned.
    signal.signal(signal.SIGTERM, stop_worker)
    child = os.fork()
    if child == 0:
        status = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            libc.set_parent_death_signal(signal.SIGKILL)
            # Our parent is outside our pid namespace, so getppid() is 0 while it
            # lives; anything else means it died before the death signal was armed.
            if os.getppid() != (0 if inside else parent):
                os._exit(1)
            _work(spec, sock)
        except BaseException as exc:
            print(f"inside helper: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
        finally:
            sys.stderr.flush()
            os._exit(status)
    if sock is not None:
        sock.close()
    # PEP 475: waitpid() resumes after stop_worker runs.
    _, wait_status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(wait_status) if os.WIFEXITED(wait_status) else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
