"""The rule model: what a rule matches, where the device goes, and how it appears there.

These are plain frozen values; ``loader`` builds them from TOML with precise errors,
and code (tests, benchmarks, a future API) may build them directly.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import Access
from hotrelay.core.rules.glob import GlobError, Pattern
from hotrelay.core.rules.match import Condition, MatchContext
from hotrelay.core.rules.template import Template

__all__ = [
    "DeviceSpec",
    "NetdevSpec",
    "Rule",
    "Source",
    "Target",
    "TargetError",
    "UeventMode",
    "parse_pid_target",
]


class TargetError(ValueError):
    """A target that is not ``RUNTIME:PATTERN``; the message says what is wrong."""


# Container names of every supported runtime are made of these (LXC and Docker are the
# strictest); the glob characters are allowed on top, since NAME may be a glob.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?\[\]!^|\\]+\Z")
_CGROUP_PATTERN = re.compile(r"/[A-Za-z0-9_.:@+=,/\-*?\[\]!^|\\]*\Z")


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_pid_target(pattern: str) -> tuple[int, int | None]:
    """``PID`` or ``PID@STARTTIME`` (a ``pid:`` target's pattern) -> (pid, start time).

    STARTTIME is field 22 of /proc/PID/stat (clock ticks since boot): with it the
    target names one process, never whoever holds the number later.
    """
    pid, sep, start = pattern.partition("@")
    if not _decimal(pid) or int(pid) <= 0:
        raise TargetError(
            f"pid {_quote(pid)} is not a positive decimal number (expected PID or PID@STARTTIME)"
        )
    if not sep:
        return int(pid), None
    if not _decimal(start):
        raise TargetError(
            f"start time {_quote(start)} is not a decimal number (field 22 of /proc/{pid}/stat)"
        )
    return int(pid), int(start)


@dataclass(frozen=True, slots=True)
class Target:
    """``RUNTIME:PATTERN``: the containers of one runtime whose name matches a glob.

    ``pid:PID`` names one process's container by its pid (no glob), and
    ``pid:PID@STARTTIME`` only while that pid is the process started then;
    ``cgroup:PATH`` names the container whose cgroup2 path (from the hierarchy root)
    matches a glob.
    """

    runtime: Runtime
    pattern: str
    glob: Pattern = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Target:
        runtime_name, sep, pattern = text.partition(":")
        if not sep:
            raise TargetError("expected RUNTIME:NAME, such as lxc:homeassistant")
        try:
            runtime = Runtime(runtime_name)
        except ValueError:
            known = ", ".join(sorted(r.value for r in Runtime))
            raise TargetError(
                f"unknown runtime {_quote(runtime_name)}; expected one of {known}"
            ) from None
        if not pattern:
            raise TargetError(f"empty name after {_quote(runtime_name + ':')}")
        if runtime is Runtime.PID:
            parse_pid_target(pattern)
        elif runtime is Runtime.CGROUP:
            if not _CGROUP_PATTERN.match(pattern):
                raise TargetError(
                    f"cgroup {_quote(pattern)} is not an absolute cgroup path such as "
                    "/machine.slice/machine-web.scope"
                )
            if any(part in (".", "..") for part in pattern.split("/")):
                raise TargetError(
                    f"cgroup {_quote(pattern)} must not contain '.' or '..' components"
                )
        elif not _NAME_PATTERN.match(pattern):
            raise TargetError(
                f"{_quote(pattern)} is not a container name or name glob "
                "(letters, digits, '_', '.', '-' and glob characters)"
            )
        try:
            glob = Pattern.parse(pattern)
        except GlobError as exc:
            raise TargetError(str(exc)) from None
        return cls(runtime, pattern, glob)

    def __str__(self) -> str:
        return f"{self.runtime.value}:{self.pattern}"

    def selects(self, container: ContainerRef) -> bool:
        """Does this target name ``container``? (For the relay, once containers resolve.)"""
        if container.runtime is not self.runtime:
            return False
        if self.runtime is Runtime.PID:
            pid, start = parse_pid_target(self.pattern)
            return container.pid == pid and start in (None, container.start_time)
        if self.runtime is Runtime.CGROUP:
            return self.glob.matches(container.unified_cgroup or container.devices_cgroup)
        return self.glob.matches(container.name) or (
            bool(container.id) and self.glob.matches(container.id)
        )


class UeventMode(enum.Enum):
    """Which wire format(s) the uevent is replayed on inside the container.

    ``auto`` lets the injector choose per container: the kernel format when udevd runs
    inside (it processes and rebroadcasts), libudev's otherwise (what libudev and
    libusb listeners wait for).
    """

    AUTO = "auto"
    KERNEL = "kernel"
    UDEV = "udev"
    BOTH = "both"
    NONE = "none"


ALL_ACCESS = Access()  # "rwm"
Owner = int | str  # a number, or a name resolved in the container's /etc/passwd or /etc/group


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """``[rule.device]``: how a device node appears in the container.

    ``path`` None keeps the host's node path; ``mode`` None copies the host node's
    permission bits. ``symlinks`` are relative to /dev.
    """

    path: Template | None = None
    mode: int | None = None
    owner: Owner = 0
    group: Owner = 0
    access: Access = ALL_ACCESS
    symlinks: tuple[Template, ...] = ()
    uevent: UeventMode = UeventMode.AUTO


@dataclass(frozen=True, slots=True)
class NetdevSpec:
    """``[rule.netdev]``: a network interface moved into the container; ``name`` None keeps it."""

    name: Template | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where a rule was written: the file and the line of its ``[[rule]]`` header."""

    path: str
    line: int
    name_line: int = field(default=0, compare=False)  # the line of ``name = ...``

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: all ``conditions`` must hold; then the device goes to every target.

    Conditions are kept sorted cheapest first (event fields before sysfs reads), which
    is also the order ``explain`` reports the first failure in.
    """

    name: str
    targets: tuple[Target, ...]
    conditions: tuple[Condition, ...]
    device: DeviceSpec = DeviceSpec()
    netdev: NetdevSpec = NetdevSpec()
    description: str = ""
    source: Source = Source("<rules>", 0)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.conditions, key=lambda c: c.order))
        if ordered != self.conditions:
            object.__setattr__(self, "conditions", ordered)

    @classmethod
    def build(
        cls,
        name: str,
        targets: Iterable[str],
        conditions: Iterable[Condition],
        *,
        device: DeviceSpec | None = None,
        netdev: NetdevSpec | None = None,
    ) -> Rule:
        """Convenience for code and tests: targets as strings."""
        return cls(
            name,
            tuple(Target.parse(t) for t in targets),
            tuple(conditions),
            device=DeviceSpec() if device is None else device,
            netdev=NetdevSpec() if netdev is None else netdev,
        )

    def matches(self, ctx: MatchContext) -> bool:
        # A plain loop, not all(genexpr): this runs for every candidate of every event.
        for condition in self.conditions:  # noqa: SIM110
            if not condition.test(ctx):
                return False
        return True

    def explain(self, ctx: MatchContext) -> str | None:
        """None if the rule matches, else the first failed condition and the value seen."""
        for condition in self.conditions:
            failure = condition.explain(ctx)
            if failure is not None:
                return failure
        return None
