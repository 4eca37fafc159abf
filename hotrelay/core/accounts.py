"""A container's users and groups: parse /etc/passwd and /etc/group text, look names up.

Pure: the bytes come from ``hotrelay.runtimes.names``, which reads them inside the
container's root without following symlinks out of it. A rule's ``owner = "root"`` and
``group = "dialout"`` resolve here to the container's own ids; the container's id map
then turns them into host ids (:func:`to_host_id`).

Parsing follows glibc's files backend: a line is ``name:passwd:id:...``; lines that do
not parse (comments, NIS ``+``/``-`` entries, garbage) are skipped, and the first entry
for a name wins.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from hotrelay.core.containers import IdMap

__all__ = [
    "Accounts",
    "GroupEntry",
    "IdKind",
    "UnknownAccountError",
    "UnmappedIdError",
    "UserEntry",
    "parse_group",
    "parse_passwd",
    "to_host_id",
]

# Largest valid id: (uid_t)-1 is the "no id" marker.
MAX_ID = 4294967294


_Entry = TypeVar("_Entry", "UserEntry", "GroupEntry")


class IdKind(enum.Enum):
    USER = "user"
    GROUP = "group"


class UnknownAccountError(LookupError):
    """A user or group name that the container's /etc/passwd or /etc/group lacks."""

    def __init__(self, kind: IdKind, name: str, where: str = "") -> None:
        self.kind = kind
        self.name = name
        file = "/etc/passwd" if kind is IdKind.USER else "/etc/group"
        suffix = f" in {where}" if where else ""
        super().__init__(f"no {kind.value} {name!r} in {file}{suffix}")


class UnmappedIdError(LookupError):
    """A container id that its user namespace does not map to any host id."""

    def __init__(self, kind: IdKind, inside: int) -> None:
        self.kind = kind
        self.inside = inside
        super().__init__(f"{kind.value} id {inside} is not mapped to the host by the id map")


@dataclass(frozen=True, slots=True)
class UserEntry:
    name: str
    uid: int
    gid: int
    home: str = ""
    shell: str = ""


@dataclass(frozen=True, slots=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...] = ()


def _parse_id(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _valid_name(name: str) -> bool:
    return bool(name) and name[0] not in "+-#" and not any(c.isspace() for c in name)


def parse_passwd(text: str) -> tuple[UserEntry, ...]:
    """Entries of an /etc/passwd, in file order; unparsable lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not _valid_name(fields[0]):
            continue
        uid, gid = _parse_id(fields[2]), _parse_id(fields[3])
        if uid is None or gid is None:
            continue
        home = fields[5] if len(fields) > 5 else ""
        shell = fields[6] if len(fields) > 6 else ""
        entries.append(UserEntry(fields[0], uid, gid, home, shell))
    return tuple(entries)


def parse_group(text: str) -> tuple[GroupEntry, ...]:
    """Entries of an /etc/group, in file order; unparsable lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 3 or not _valid_name(fields[0]):
            continue
        gid = _parse_id(fields[2])
        if gid is None:
            continue
        members = tuple(m for m in fields[3].split(",") if m) if len(fields) > 3 else ()
        entries.append(GroupEntry(fields[0], gid, members))
    return tuple(entries)


def _first_by_name(entries: tuple[_Entry, ...]) -> Mapping[str, _Entry]:
    found: dict[str, _Entry] = {}
    for entry in entries:
        found.setdefault(entry.name, entry)
    return MappingProxyType(found)


@dataclass(frozen=True, slots=True)
class Accounts:
    """The users and groups of one container (or the host)."""

    users: tuple[UserEntry, ...] = ()
    groups: tuple[GroupEntry, ...] = ()
    where: str = ""
    _users_by_name: Mapping[str, UserEntry] = field(init=False, repr=False, compare=False)
    _groups_by_name: Mapping[str, GroupEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_users_by_name", _first_by_name(self.users))
        object.__setattr__(self, "_groups_by_name", _first_by_name(self.groups))

    @classmethod
    def parse(cls, passwd: str, group: str, *, where: str = "") -> Accounts:
        return cls(parse_passwd(passwd), parse_group(group), where)

    def user(self, name: str) -> UserEntry:
        try:
            return self._users_by_name[name]
        except KeyError:
            raise UnknownAccountError(IdKind.USER, name, self.where) from None

    def group(self, name: str) -> GroupEntry:
        try:
            return self._groups_by_name[name]
        except KeyError:
            raise UnknownAccountError(IdKind.GROUP, name, self.where) from None

    def uid(self, spec: str | int) -> int:
        """A user name or a numeric uid (``"1000"`` or ``1000``) -> the container's uid."""
        number = _numeric(spec)
        return number if number is not None else self.user(str(spec)).uid

    def gid(self, spec: str | int) -> int:
        """A group name or a numeric gid -> the container's gid."""
        number = _numeric(spec)
        return number if number is not None else self.group(str(spec)).gid


def _numeric(spec: str | int) -> int | None:
    if isinstance(spec, int):
        if not 0 <= spec <= MAX_ID:
            raise ValueError(f"id {spec} is out of range")
        return spec
    return _parse_id(spec)


def to_host_id(id_map: IdMap, inside: int, kind: IdKind) -> int:
    """The host id for container id ``inside`` through ``id_map``; raises if unmapped."""
    host = id_map.to_host(inside)
    if host is None:
        raise UnmappedIdError(kind, inside)
    return host
