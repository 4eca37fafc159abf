"""The wire protocol between the daemon and its helpers, declared once.

Every request and every reply is a frozen dataclass; a message is the JSON object of
its fields plus ``"op"``, the class's ``op`` name, sent as one SOCK_SEQPACKET datagram
with descriptors (if any) as SCM_RIGHTS. Decoding checks every field's type, so a
message is either exactly one of these values or a ``ProtocolError``.

Both directions are bounded: no message may exceed ``MAX_MESSAGE`` bytes, and the
receiver's buffer is one byte larger so that a longer one is seen truncated
(MSG_TRUNC) rather than silently cut. Replies quote container-controlled data (link
targets, what was found at a path) only through ``quote``, which caps it, and cap how
many paths they list; so the largest reply is far below the limit whatever the
container planted.

This module is imported by the helper processes too: it uses nothing but the
standard library's json and dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "LEFT_LIMIT",
    "MAX_FDS",
    "MAX_MESSAGE",
    "PATH_LIMIT",
    "QUOTE_LIMIT",
    "RECEIVE_BUFFER",
    "AccountTexts",
    "BindNode",
    "Created",
    "Existence",
    "Exists",
    "Failure",
    "ForkHelper",
    "Forked",
    "MakeNode",
    "MakeSymlink",
    "Ping",
    "Pong",
    "ProtocolError",
    "ReadAccounts",
    "RemoveNode",
    "RemoveSymlink",
    "Removed",
    "Reply",
    "Request",
    "RouteSocket",
    "SendUevent",
    "Sent",
    "Socket",
    "decode_reply",
    "decode_request",
    "encode",
    "quote",
]

MAX_MESSAGE = 64 * 1024
# One byte more than any message may have: a longer one arrives with MSG_TRUNC set.
RECEIVE_BUFFER = MAX_MESSAGE + 1
MAX_FDS = 5
# What a reply may quote of container-controlled text, and how many paths it lists.
QUOTE_LIMIT = 96
PATH_LIMIT = 1024
LEFT_LIMIT = 16


class ProtocolError(ValueError):
    """A message that is not one of ours (wrong JSON, unknown op, a field of the wrong type)."""


def quote(text: str) -> str:
    """repr() of container-controlled text, capped at QUOTE_LIMIT characters."""
    if len(text) <= QUOTE_LIMIT:
        return repr(text)
    return f"{text[:QUOTE_LIMIT]!r}... ({len(text)} characters)"


# -- the field types a message may carry ------------------------------------------------


def _is_str_tuple(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_pair_tuple(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v) for v in value
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS: dict[str, Any] = {
    "int": _is_int,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "str | None": lambda v: v is None or isinstance(v, str),
    "int | None": lambda v: v is None or _is_int(v),
    "tuple[str, ...]": _is_str_tuple,
    "tuple[tuple[str, str], ...]": _is_pair_tuple,
}


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(kind: str, value: Any) -> Any:
    if kind == "tuple[str, ...]":
        return tuple(value)
    if kind == "tuple[tuple[str, str], ...]":
        return tuple((a, b) for a, b in value)
    return value


class _Message:
    op: ClassVar[str]


# -- requests (daemon -> helper) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    op: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class MakeNode(_Message):
    """mknod at path (privileged containers); ids are host ids."""

    op: ClassVar[str] = "make_node"
    path: str
    kind: str
    major: int
    minor: int
    mode: int
    uid: int
    gid: int
    dir_uid: int
    dir_gid: int


@dataclass(frozen=True, slots=True)
class BindNode(_Message):
    """Mount the detached node passed as the one descriptor onto a new empty file at path."""

    op: ClassVar[str] = "bind_node"
    path: str
    kind: str
    major: int
    minor: int
    dir_uid: int
    dir_gid: int


@dataclass(frozen=True, slots=True)
class MakeSymlink(_Message):
    op: ClassVar[str] = "make_symlink"
    path: str
    target: str
    dir_uid: int
    dir_gid: int


@dataclass(frozen=True, slots=True)
class RemoveNode(_Message):
    op: ClassVar[str] = "remove_node"
    path: str
    kind: str
    major: int
    minor: int
    method: str
    dirs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RemoveSymlink(_Message):
    op: ClassVar[str] = "remove_symlink"
    path: str
    target: str
    dirs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exists(_Message):
    """Whether path exists in the container, symlinks resolved within its root."""

    op: ClassVar[str] = "exists"
    path: str


@dataclass(frozen=True, slots=True)
class SendUevent(_Message):
    """A uevent into the container's netns; payload is hex (JSON has no bytes)."""

    op: ClassVar[str] = "send_uevent"
    wire: str
    payload: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class RouteSocket(_Message):
    """A NETLINK_ROUTE socket made in the container's netns, returned as a descriptor."""

    op: ClassVar[str] = "route_socket"


@dataclass(frozen=True, slots=True)
class DevDirectory(_Message):
    """An O_PATH descriptor of the container's /dev, if it is an in-memory filesystem
    (tmpfs): the daemon checks for its nodes there itself, since no lookup on tmpfs
    can wait on userspace (as one on a FUSE mount could)."""

    op: ClassVar[str] = "dev_directory"


@dataclass(frozen=True, slots=True)
class ReadAccounts(_Message):
    """The container's /etc/passwd and /etc/group, read inside its root (a file that
    never answers, on a hung FUSE mount, then parks this helper, never the daemon)."""

    op: ClassVar[str] = "read_accounts"


@dataclass(frozen=True, slots=True)
class ForkHelper(_Message):
    """To the fork server: fork a helper for ``container``.

    Descriptors, in order: the helper's end of its socket, the container init's pidfd,
    its root directory, its mount namespace and, with ``join_net``, its network
    namespace.
    """

    op: ClassVar[str] = "fork_helper"
    container: str
    join_net: bool


Request = (
    Ping
    | MakeNode
    | BindNode
    | MakeSymlink
    | RemoveNode
    | RemoveSymlink
    | Exists
    | SendUevent
    | RouteSocket
    | DevDirectory
    | ReadAccounts
    | ForkHelper
)


# -- replies (helper -> daemon) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pong(_Message):
    op: ClassVar[str] = "pong"
    pid: int


@dataclass(frozen=True, slots=True)
class Created(_Message):
    """What the helper created besides the object itself: directories, outermost first."""

    op: ClassVar[str] = "created"
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Removed(_Message):
    """What a removal did: paths removed, and (path, why) for what it left alone.

    ``left`` lists at most LEFT_LIMIT entries; ``more_left`` counts the rest.
    """

    op: ClassVar[str] = "removed"
    removed: tuple[str, ...] = ()
    left: tuple[tuple[str, str], ...] = ()
    more_left: int = 0


@dataclass(frozen=True, slots=True)
class Existence(_Message):
    op: ClassVar[str] = "existence"
    exists: bool


@dataclass(frozen=True, slots=True)
class Sent(_Message):
    op: ClassVar[str] = "sent"


@dataclass(frozen=True, slots=True)
class Socket(_Message):
    """The reply carries one descriptor: a socket."""

    op: ClassVar[str] = "socket"


@dataclass(frozen=True, slots=True)
class Directory(_Message):
    """The reply carries one descriptor: an O_PATH directory."""

    op: ClassVar[str] = "directory"


@dataclass(frozen=True, slots=True)
class AccountTexts(_Message):
    """The reply carries one descriptor, a memfd: ``passwd`` bytes of /etc/passwd,
    then ``group`` bytes of /etc/group (0 for a file that does not exist)."""

    op: ClassVar[str] = "account_texts"
    passwd: int
    group: int


@dataclass(frozen=True, slots=True)
class Forked(_Message):
    """From the fork server: the helper runs; the reply carries its pidfd."""

    op: ClassVar[str] = "forked"
    pid: int


@dataclass(frozen=True, slots=True)
class Failure(_Message):
    """An expected failure: ``kind`` is unsafe, exists, invalid, os or internal."""

    op: ClassVar[str] = "failure"
    kind: str
    message: str
    path: str | None = None
    errno: int | None = None


Reply = (
    Pong
    | Created
    | Removed
    | Existence
    | Sent
    | Socket
    | Directory
    | AccountTexts
    | Forked
    | Failure
)

_REQUESTS: dict[str, type[Any]] = {
    cls.op: cls
    for cls in (
        Ping,
        MakeNode,
        BindNode,
        MakeSymlink,
        RemoveNode,
        RemoveSymlink,
        Exists,
        SendUevent,
        RouteSocket,
        DevDirectory,
        ReadAccounts,
        ForkHelper,
    )
}
_REPLIES: dict[str, type[Any]] = {
    cls.op: cls
    for cls in (
        Pong,
        Created,
        Removed,
        Existence,
        Sent,
        Socket,
        Directory,
        AccountTexts,
        Forked,
        Failure,
    )
}


def encode(message: Request | Reply) -> bytes:
    """The datagram for one message; ProtocolError if it would exceed MAX_MESSAGE."""
    fields = {f.name: _to_json(getattr(message, f.name)) for f in dataclasses.fields(message)}
    data = json.dumps({"op": message.op, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{message.op} message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def _decode(data: bytes, known: dict[str, type[Any]]) -> Any:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("not a JSON object")
    cls = known.get(raw.pop("op", None))
    if cls is None:
        raise ProtocolError("unknown op")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            if field.default is dataclasses.MISSING:
                raise ProtocolError(f"{cls.op}: missing field {field.name}")
            continue
        value = raw.pop(field.name)
        if not _CHECKS[str(field.type)](value):
            raise ProtocolError(f"{cls.op}: field {field.name} has the wrong type")
        values[field.name] = _from_json(str(field.type), value)
    if raw:
        raise ProtocolError(f"{cls.op}: unknown fields {sorted(raw)[:4]}")
    return cls(**values)


def decode_request(data: bytes) -> Request:
    message: Request = _decode(data, _REQUESTS)
    return message


def decode_reply(data: bytes) -> Reply:
    message: Reply = _decode(data, _REPLIES)
    return message
