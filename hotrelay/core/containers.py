"""Containers as the relay sees them: pure data, filled in by the runtime adapters.

A ``ContainerRef`` is a snapshot of one running container: which runtime knows it and
by what name, its init pid, its cgroups, its namespaces and its id maps. Everything the
effectors need to grant a device, create a node and inject a uevent is here, so the
core can plan without asking the kernel anything.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hotrelay.core.device_access import DeviceRule

__all__ = [
    "ContainerEvent",
    "ContainerRef",
    "ContainerStarted",
    "ContainerStopped",
    "IdMap",
    "IdRange",
    "Runtime",
]


class Runtime(enum.Enum):
    """The runtimes a target may name (``RUNTIME:NAME``)."""

    LXC = "lxc"
    INCUS = "incus"
    LXD = "lxd"
    DOCKER = "docker"
    PODMAN = "podman"
    RUNC = "runc"
    NSPAWN = "nspawn"
    PID = "pid"
    CGROUP = "cgroup"


@dataclass(frozen=True, slots=True)
class IdRange:
    """One line of /proc/PID/uid_map: ``inside`` maps to ``outside`` for ``count`` ids."""

    inside: int
    outside: int
    count: int

    def __post_init__(self) -> None:
        if self.inside < 0 or self.outside < 0 or self.count <= 0:
            raise ValueError(f"invalid id range {self.inside} {self.outside} {self.count}")


@dataclass(frozen=True, slots=True)
class IdMap:
    """A uid or gid map. The empty map means no user namespace: ids are the host's."""

    ranges: tuple[IdRange, ...] = ()

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """Parse the content of /proc/PID/uid_map or gid_map."""
        ranges = []
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or not all(f.isdigit() for f in fields):
                raise ValueError(f"id map line {lineno}: {line!r} is not 'INSIDE OUTSIDE COUNT'")
            ranges.append(IdRange(int(fields[0]), int(fields[1]), int(fields[2])))
        return cls(tuple(ranges))

    @classmethod
    def identity(cls) -> IdMap:
        return cls((IdRange(0, 0, 4294967295),))

    @property
    def is_identity(self) -> bool:
        return not self.ranges or self.ranges == IdMap.identity().ranges

    def to_host(self, inside: int) -> int | None:
        """The host id for container id ``inside``; None if it is not mapped."""
        if not self.ranges:
            return inside
        for r in self.ranges:
            if r.inside <= inside < r.inside + r.count:
                return r.outside + (inside - r.inside)
        return None

    def from_host(self, outside: int) -> int | None:
        """The container's id for host id ``outside``; None if unmapped (shows as 65534)."""
        if not self.ranges:
            return outside
        for r in self.ranges:
            if r.outside <= outside < r.outside + r.count:
                return r.inside + (outside - r.outside)
        return None

    def render(self) -> str:
        return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in self.ranges)


def _frozen_mapping(items: Mapping[str, int] | Iterable[tuple[str, int]]) -> Mapping[str, int]:
    return MappingProxyType(dict(items))


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """One running container, as resolved by its runtime adapter.

    ``devices_cgroup`` is the v1 devices-hierarchy path (relative to the hierarchy root,
    e.g. ``/lxc.payload.c1``) and ``unified_cgroup`` the cgroup2 path; either is None
    when the host has no such hierarchy. ``namespaces`` maps a kind (mnt, net, user,
    pid, ...) to its inode. ``start_time`` is the init process's start time in clock
    ticks (field 22 of /proc/PID/stat), which tells a reused pid from the real one.
    ``base_device_rules`` are the runtime's own device rules, when it states them (OCI
    config, LXC config); the cgroup v2 effector rebuilds a program from them when it
    cannot read one back.
    """

    runtime: Runtime
    name: str
    pid: int
    id: str = ""
    start_time: int | None = None
    devices_cgroup: str | None = None
    unified_cgroup: str | None = None
    namespaces: Mapping[str, int] = field(default_factory=dict, hash=False)
    uid_map: IdMap = IdMap()
    gid_map: IdMap = IdMap()
    host_network: bool = False
    privileged: bool = True
    base_device_rules: tuple[DeviceRule, ...] = ()

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"container {self.target}: invalid pid {self.pid}")
        if not isinstance(self.namespaces, MappingProxyType):
            object.__setattr__(self, "namespaces", _frozen_mapping(self.namespaces))

    @property
    def target(self) -> str:
        """How a rule names this container: ``RUNTIME:NAME``."""
        return f"{self.runtime.value}:{self.name}"

    @property
    def user_namespaced(self) -> bool:
        return not self.uid_map.is_identity

    @property
    def key(self) -> tuple[Runtime, str]:
        """Identity across restarts: the same runtime and name is the same container."""
        return (self.runtime, self.name)


@dataclass(frozen=True, slots=True)
class ContainerStarted:
    """A runtime watcher saw ``container`` running (at start-up, on a resync, or live)."""

    container: ContainerRef

    @property
    def key(self) -> tuple[Runtime, str]:
        return self.container.key


@dataclass(frozen=True, slots=True)
class ContainerStopped:
    """The container last reported by a ContainerStarted is gone.

    ``container`` is that last reported snapshot, so a consumer can undo exactly what
    it did for that pid; ``reason`` says how the watcher found out (``exited``: the
    init process's pidfd became readable; ``runtime``: the runtime reports it stopped
    or replaced; ``vanished``: it disappeared from a listing).
    """

    container: ContainerRef
    reason: str = "exited"

    @property
    def key(self) -> tuple[Runtime, str]:
        return self.container.key


ContainerEvent = ContainerStarted | ContainerStopped
