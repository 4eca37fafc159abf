"""Device-cgroup rules: ``TYPE MAJOR:MINOR ACCESS`` as v1 lists them and runtimes state them.

The same small model serves both cgroup versions: v1 takes these lines in
``devices.allow``/``devices.deny`` and reports them in ``devices.list``; on v2 the
runtime compiles an ordered list of them into a BPF program, which we must preserve.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Access", "DeviceRule", "DeviceType", "parse_devices_list"]


class DeviceType(enum.Enum):
    ALL = "a"
    BLOCK = "b"
    CHAR = "c"


_ACCESS_ORDER = "rwm"


@dataclass(frozen=True, slots=True)
class Access:
    """A subset of ``rwm``: read, write, mknod."""

    read: bool = True
    write: bool = True
    mknod: bool = True

    @classmethod
    def parse(cls, text: str) -> Access:
        if not text or any(c not in _ACCESS_ORDER for c in text) or len(set(text)) != len(text):
            raise ValueError(f"access {text!r} is not a subset of 'rwm'")
        return cls("r" in text, "w" in text, "m" in text)

    def __str__(self) -> str:
        return "".join(c for c, on in zip(_ACCESS_ORDER, self._bits(), strict=True) if on)

    def _bits(self) -> tuple[bool, bool, bool]:
        return (self.read, self.write, self.mknod)

    def covers(self, other: Access) -> bool:
        return all(
            mine or not theirs for mine, theirs in zip(self._bits(), other._bits(), strict=True)
        )

    def __or__(self, other: Access) -> Access:
        return Access(self.read or other.read, self.write or other.write, self.mknod or other.mknod)


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """One rule. ``major``/``minor`` None mean ``*``. ``allow`` False is a deny rule."""

    type: DeviceType
    major: int | None
    minor: int | None
    access: Access = Access()
    allow: bool = True

    @classmethod
    def parse(cls, line: str, *, allow: bool = True) -> DeviceRule:
        """Parse ``c 1:3 rwm`` (devices.list / devices.allow syntax); ``a`` means ``a *:* rwm``."""
        fields = line.split()
        if fields == ["a"]:
            return cls(DeviceType.ALL, None, None, Access(), allow)
        if len(fields) != 3:
            raise ValueError(f"device rule {line!r} is not 'TYPE MAJOR:MINOR ACCESS'")
        try:
            kind = DeviceType(fields[0])
        except ValueError:
            raise ValueError(f"device rule {line!r}: type must be a, b or c") from None
        major_s, sep, minor_s = fields[1].partition(":")
        if not sep:
            raise ValueError(f"device rule {line!r}: expected MAJOR:MINOR")
        return cls(
            kind, _number(major_s, line), _number(minor_s, line), Access.parse(fields[2]), allow
        )

    @classmethod
    def from_oci(cls, entry: Mapping[str, object]) -> DeviceRule:
        """From an OCI runtime-spec ``linux.resources.devices`` entry (runc's state.json too)."""
        kind = entry.get("type", "a") or "a"
        major = entry.get("major")
        minor = entry.get("minor")
        access = entry.get("access", "rwm") or "rwm"
        allow = entry.get("allow", True)
        if not isinstance(kind, str) or not isinstance(access, str) or not isinstance(allow, bool):
            raise ValueError(f"OCI device rule {dict(entry)!r} has fields of the wrong type")
        return cls(
            DeviceType(kind),
            _oci_number(major),
            _oci_number(minor),
            Access.parse(access),
            allow,
        )

    def render(self) -> str:
        """The devices.allow / devices.deny line."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type.value} {major}:{minor} {self.access}"

    def matches(self, kind: DeviceType, major: int, minor: int) -> bool:
        """Does this rule's device pattern cover device ``kind major:minor``?"""
        return (
            (self.type is DeviceType.ALL or self.type is kind)
            and (self.major is None or self.major == major)
            and (self.minor is None or self.minor == minor)
        )

    def covers(self, other: DeviceRule) -> bool:
        """Does this rule's pattern include ``other``'s whole pattern, with all its access?

        How cgroup v1 decides that an exception already allows a request (or a wider
        rule): type ``a`` or equal, ``*`` or equal numbers, access a superset.
        """
        return (
            (self.type is DeviceType.ALL or self.type is other.type)
            and (self.major is None or self.major == other.major)
            and (self.minor is None or self.minor == other.minor)
            and self.access.covers(other.access)
        )


def _number(text: str, line: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit():
        raise ValueError(f"device rule {line!r}: {text!r} is not a number or '*'")
    return int(text)


def _oci_number(value: object) -> int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"OCI device number {value!r} is not a non-negative integer")
    return value


@functools.lru_cache(maxsize=256)
def parse_devices_list(text: str) -> tuple[DeviceRule, ...]:
    """Parse a v1 ``devices.list``; ``a *:* rwm`` alone means allow-all mode.

    Cached: a grant or revoke reads the same few lists several times, and the rules
    are immutable, so one parse serves them all (about 60 us for a runtime's list).
    """
    return tuple(DeviceRule.parse(line) for line in text.splitlines() if line.strip())
