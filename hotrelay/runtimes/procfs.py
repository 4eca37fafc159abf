"""What the kernel says about a container, read from its init process in /proc.

Every adapter ends here: the runtime names an init pid; this module holds a pidfd on
it, reads its cgroups, namespaces, id maps and start time, and checks the process is
still the same one afterwards. A pid that was reused by an unrelated process is told
apart by its start time (field 22 of /proc/PID/stat, in clock ticks since boot), which
runc records as ``init_process_start`` and :class:`ContainerRef` carries as
``start_time``; a process that dies during the reads makes the pidfd readable, and the
snapshot is thrown away as :class:`ContainerGone` rather than returned half-true.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio

from hotrelay.core.containers import ContainerRef, IdMap, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.errors import ContainerGone

__all__ = [
    "NAMESPACE_KINDS",
    "PidHandle",
    "ProcessInfo",
    "host_namespaces",
    "parse_cgroup_file",
    "parse_stat_start_time",
    "read_process",
    "snapshot",
]

PROC = Path("/proc")
NAMESPACE_KINDS = ("mnt", "net", "user", "pid", "uts", "ipc", "cgroup", "time")
# Errors that mean "that process is not there (any more)".
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENOTDIR})


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The container-relevant facts about one process."""

    pid: int
    start_time: int
    devices_cgroup: str | None
    unified_cgroup: str | None
    namespaces: Mapping[str, int] = field(hash=False)
    uid_map: IdMap
    gid_map: IdMap
    host_network: bool
    nspid: tuple[int, ...] = ()

    @property
    def is_namespace_init(self) -> bool:
        """Is this process pid 1 of its (innermost) pid namespace?"""
        return len(self.nspid) > 1 and self.nspid[-1] == 1


def parse_stat_start_time(text: str) -> int:
    """Field 22 (starttime) of /proc/PID/stat; the comm field may hold spaces and ')'."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    # rest starts at field 3 (state), so field 22 is index 19.
    if not sep or len(fields) < 20 or not fields[19].isdigit():
        raise ValueError(f"unexpected /proc/PID/stat content: {text[:80]!r}")
    return int(fields[19])


def parse_cgroup_file(text: str) -> tuple[str | None, str | None]:
    """(v1 devices path, cgroup2 path) from /proc/PID/cgroup; None where absent."""
    devices: str | None = None
    unified: str | None = None
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "devices" in controllers.split(","):
            devices = path
    return devices, unified


def _parse_nspid(status: str) -> tuple[int, ...]:
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return tuple(int(f) for f in line.split()[1:] if f.isdigit())
    return ()


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _gone(pid: int, exc: OSError) -> ContainerGone:
    return ContainerGone(f"process {pid} is gone ({exc.strerror or exc})")


def host_namespaces(proc: Path = PROC) -> Mapping[str, tuple[int, int]]:
    """(st_dev, st_ino) of the relay's own namespaces: the host's, when run as intended."""
    found = {}
    for kind in NAMESPACE_KINDS:
        try:
            st = os.stat(proc / "self" / "ns" / kind)
        except FileNotFoundError:
            continue
        found[kind] = (st.st_dev, st.st_ino)
    return found


def read_process(pid: int, *, proc: Path = PROC) -> ProcessInfo:
    """Read one process's facts; raises ContainerGone if it does not exist.

    No pidfd check here: :func:`snapshot` wraps this with one, which is what callers
    that hand the result on should use.
    """
    base = proc / str(pid)
    try:
        start_time = parse_stat_start_time(_read(base / "stat"))
        devices, unified = parse_cgroup_file(_read(base / "cgroup"))
        nspid = _parse_nspid(_read(base / "status"))
        uid_map = IdMap.parse(_read(base / "uid_map"))
        gid_map = IdMap.parse(_read(base / "gid_map"))
        namespaces: dict[str, int] = {}
        own = host_namespaces(proc)
        host_network = False
        for kind in NAMESPACE_KINDS:
            try:
                st = os.stat(base / "ns" / kind)
            except FileNotFoundError:
                if not (base / "ns").is_dir():
                    raise
                continue  # a namespace kind this kernel lacks
            namespaces[kind] = st.st_ino
            if kind == "net":
                host_network = own.get("net") == (st.st_dev, st.st_ino)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            raise _gone(pid, exc) from None
        raise
    except ValueError as exc:
        # A half-torn-down process can show empty files; anything else is a bug.
        raise ContainerGone(f"process {pid}: {exc}") from None
    return ProcessInfo(
        pid=pid,
        start_time=start_time,
        devices_cgroup=devices,
        unified_cgroup=unified,
        namespaces=namespaces,
        uid_map=uid_map,
        gid_map=gid_map,
        host_network=host_network,
        nspid=nspid,
    )


class PidHandle:
    """A pidfd on a container's init: it names that process and no later one.

    Open with :meth:`open`; ``expected_start_time`` rejects a pid that already belongs
    to another process. :meth:`alive` polls without blocking; :meth:`wait_exit` sleeps
    until the process exits (the pidfd becomes readable).
    """

    def __init__(self, pid: int, pidfd: int, start_time: int) -> None:
        self.pid = pid
        self.start_time = start_time
        self._fd: int | None = pidfd

    @classmethod
    def open(cls, pid: int, *, expected_start_time: int | None = None) -> PidHandle:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
                raise ContainerGone(f"process {pid} is gone") from None
            raise
        handle = cls(pid, pidfd, 0)
        try:
            try:
                start_time = parse_stat_start_time(_read(PROC / str(pid) / "stat"))
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise _gone(pid, exc) from None
                raise
            if expected_start_time is not None and start_time != expected_start_time:
                raise ContainerGone(
                    f"pid {pid} now belongs to another process "
                    f"(start time {start_time}, expected {expected_start_time})"
                )
            handle.start_time = start_time
            handle.check_alive()
        except BaseException:
            handle.close()
            raise
        return handle

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"pid handle {self.pid} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def alive(self) -> bool:
        """Still running? (A readable pidfd means the process has exited.)"""
        readable, _, _ = select.select([self.fd], [], [], 0)
        return not readable

    def check_alive(self) -> None:
        if not self.alive():
            raise ContainerGone(f"process {self.pid} exited")

    async def wait_exit(self) -> None:
        """Return once the process has exited."""
        await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Wakes a task blocked in wait_exit(); outside trio there is none.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def __enter__(self) -> PidHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<PidHandle pid={self.pid} start={self.start_time} {state}>"


def snapshot(
    runtime: Runtime,
    name: str,
    pid: int,
    *,
    id: str = "",
    expected_start_time: int | None = None,
    base_device_rules: tuple[DeviceRule, ...] = (),
    proc: Path = PROC,
) -> ContainerRef:
    """A ContainerRef for ``pid``, read while a pidfd pins the process.

    Raises ContainerGone when the pid does not exist, is another process than
    ``expected_start_time`` says, or exits during the reads.
    """
    if pid <= 0:
        raise ContainerGone(f"{runtime.value}:{name} has no init process (pid {pid})")
    with PidHandle.open(pid, expected_start_time=expected_start_time) as handle:
        info = read_process(pid, proc=proc)
        # Alive after the reads: the pid was never free, so every read was this process.
        handle.check_alive()
        if info.start_time != handle.start_time:
            raise ContainerGone(f"pid {pid} was reused during the lookup")
    return ref_from_info(runtime, name, info, id=id, base_device_rules=base_device_rules)


def ref_from_info(
    runtime: Runtime,
    name: str,
    info: ProcessInfo,
    *,
    id: str = "",
    base_device_rules: tuple[DeviceRule, ...] = (),
) -> ContainerRef:
    return ContainerRef(
        runtime=runtime,
        name=name,
        pid=info.pid,
        id=id,
        start_time=info.start_time,
        devices_cgroup=info.devices_cgroup,
        unified_cgroup=info.unified_cgroup,
        namespaces=info.namespaces,
        uid_map=info.uid_map,
        gid_map=info.gid_map,
        host_network=info.host_network,
        privileged=info.uid_map.is_identity,
        base_device_rules=base_device_rules,
    )
