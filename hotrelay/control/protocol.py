"""The control socket's protocol: JSON lines, validated requests, who may do what. Pure.

One request per line, one response per line (UTF-8 JSON objects, LF-terminated)::

    -> {"id": 7, "verb": "attach", "args": {"target": "lxc:ha", "device": "/dev/ttyUSB0"}}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 7, "ok": false, "error": "no container lxc:ha is running", "code": "failed"}

``monitor`` answers ``{"id": N, "ok": true, "result": {"subscribed": true}}`` once it is
subscribed, then streams ``{"id": N, "event": {...}}`` lines until the client leaves; such
a connection carries nothing else. Requests on one connection are answered in order.
A line that cannot be parsed gets an error with ``"id": null`` (when no id could be
read) and the connection stays open; a line over ``MAX_LINE`` bytes is refused and the
connection closed, since the server will not buffer it.

Everything here is bytes in, values out, so it can be fuzzed without a socket; the
server (``hotrelay.control.server``) does the I/O.
"""

from __future__ import annotations

import difflib
import enum
import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

__all__ = [
    "ATTACH_OPTIONS",
    "MAX_LINE",
    "READ_ONLY_VERBS",
    "VERBS",
    "Access",
    "ControlHandler",
    "ErrorCode",
    "LineBuffer",
    "LineTooLong",
    "Peer",
    "ProtocolError",
    "Request",
    "Response",
    "denied_message",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_result",
    "parse_request",
    "parse_response",
    "peer_access",
    "verb_allowed",
]

MAX_LINE = 64 * 1024  # bytes, without the newline

Json = dict[str, Any]


class ControlHandler(Protocol):
    """What the control server asks of the daemon. The daemon implements it.

    Plain methods run on the trio thread and must not block. A ``HotrelayError`` (or a
    subclass) raised here becomes ``ok: false`` with its message; any other exception is
    logged with its traceback and reported as an internal error. Results must be JSON
    values (dicts, lists, strings, numbers, booleans, None).
    """

    def status(self) -> dict[str, Any]:
        """Uptime and state. The CLI renders these keys specially when present:
        ``version``, ``uptime`` (seconds), ``source``, ``counters`` ({name: number}),
        ``containers`` ([{runtime, name, pid, ...}]), ``rule_files`` ([path or {...}]);
        anything else is printed as it comes."""
        ...

    def grants(self) -> list[dict[str, Any]]:
        """The current grants: [{container, device, path, since (unix time), ...}]."""
        ...

    async def attach(self, target: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
        """A manual grant, kept in the ledger. ``options`` holds the keys the client gave,
        among ``ATTACH_OPTIONS``: path (str), mode (octal str), owner and group (name or id)."""
        ...

    async def detach(self, target: str, device: str) -> dict[str, Any]:
        """Undo a manual grant."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read config and rules; on a problem raise HotrelayError and keep the old ones."""
        ...

    async def refresh(self, runtime: str, name: str) -> dict[str, Any]:
        """A container started or stopped (the LXC hook says so). Must return promptly:
        LXC runs the hook synchronously while the container's monitor is busy starting
        it, so asking LXC about that container from here would wait on ourselves. Schedule
        the work and answer."""
        ...

    def subscribe(self) -> AbstractContextManager[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A live feed of events and actions for ``monitor``, ended by leaving the context.

        The server drains the channel promptly into its own bounded per-client queue, so
        a slow client never backs up into the daemon; the daemon should still publish with
        ``send_nowait`` (``hotrelay.control.server.Broadcaster`` does exactly that)."""
        ...


@dataclass(frozen=True, slots=True)
class _Arg:
    kinds: tuple[type, ...]
    required: bool
    example: str  # what one looks like, for messages


_TARGET = _Arg((str,), True, 'a target such as "lxc:homeassistant"')
_DEVICE = _Arg((str,), True, 'a device such as "/dev/ttyUSB0"')

# Verb -> argument -> what it takes. The only schema: validation and the CLI follow it.
VERBS: Mapping[str, Mapping[str, _Arg]] = {
    "status": {},
    "list": {},
    "monitor": {},
    "reload": {},
    "attach": {
        "target": _TARGET,
        "device": _DEVICE,
        "path": _Arg((str,), False, 'a path in the container such as "/dev/zigbee"'),
        "mode": _Arg((str,), False, 'an octal mode such as "0660"'),
        "owner": _Arg((str, int), False, 'a user name or id such as "root" or 0'),
        "group": _Arg((str, int), False, 'a group name or id such as "dialout" or 20'),
    },
    "detach": {"target": _TARGET, "device": _DEVICE},
    "refresh": {
        "runtime": _Arg((str,), True, 'a runtime such as "lxc"'),
        "name": _Arg((str,), True, 'a container name such as "homeassistant"'),
    },
}
ATTACH_OPTIONS = ("path", "mode", "owner", "group")
# Verbs that change nothing: members of the configured socket group may use these.
READ_ONLY_VERBS = frozenset({"status", "list", "monitor"})
_REQUEST_KEYS = ("id", "verb", "args")
_MAX_ID = 2**53  # exact in every JSON implementation
_MAX_UID = 2**32 - 1


class ErrorCode(enum.Enum):
    """Why a request failed, for programs; the message is for people."""

    INVALID = "invalid"  # the request itself is wrong (JSON, verb, arguments, too long)
    DENIED = "denied"  # the peer may not do this
    FAILED = "failed"  # the daemon tried and could not (a HotrelayError)
    INTERNAL = "internal"  # a bug: logged with its traceback by the daemon
    BUSY = "busy"  # too many clients


class ProtocolError(Exception):
    """A request line that is not a valid request; ``request_id`` if one could be read."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class LineTooLong(Exception):
    """A line grew past the limit; ``complete`` holds the whole lines that came before it."""

    def __init__(self, limit: int, complete: list[bytes]) -> None:
        super().__init__(f"request line longer than {limit} bytes")
        self.limit = limit
        self.complete = complete


class LineBuffer:
    """Splits a byte stream into lines, refusing to hold more than ``limit`` bytes of one.

    Blank lines are skipped and a trailing CR is dropped, so that typing requests into
    ``socat`` works. After ``LineTooLong`` the buffer is unusable: close the connection.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._pending = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken:
            raise LineTooLong(self.limit, [])
        self._pending += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._pending.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.limit + 1 or (
                end - start == self.limit + 1 and self._pending[end - 1] != ord("\r")
            ):
                self._broken = True
                raise LineTooLong(self.limit, lines)
            line = bytes(self._pending[start:end]).removesuffix(b"\r")
            if line.strip():
                lines.append(line)
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > self.limit + 1:  # + 1: room for a CR of CRLF
            self._broken = True
            raise LineTooLong(self.limit, lines)
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._pending)


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    verb: str
    args: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    """One line from the server, as the client sees it."""

    id: int | None
    ok: bool | None  # None for an event line
    result: Any = None
    error: str | None = None
    code: str | None = None
    event: Json | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"request is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # NaN, Infinity, or an integer with too many digits
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("request is not valid JSON: nested too deeply") from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean " + json.dumps(value)
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}" if len(value) <= 40 else "a long string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {json.dumps(close[0])}?)" if close else ""


def _check_arg(request_id: int, verb: str, name: str, value: object, spec: _Arg) -> Any:
    where = f"{verb}: argument {json.dumps(name)}"
    problem = None
    if isinstance(value, bool) or not isinstance(value, spec.kinds):
        problem = f"{where}: expected {spec.example}, got {_kind(value)}"
    elif isinstance(value, str):
        if not value:
            problem = f"{where} is empty; expected {spec.example}"
        elif "\0" in value:
            problem = f"{where} contains a NUL character"
    elif isinstance(value, int) and not 0 <= value <= _MAX_UID:
        problem = f"{where}: {value} is not a valid id (0 to {_MAX_UID})"
    if problem is not None:
        raise ProtocolError(problem, request_id)
    return value


def parse_request(line: bytes) -> Request:
    """A validated request, or ``ProtocolError`` saying what is wrong with it."""
    document = _decode(line)
    if not isinstance(document, dict):
        raise ProtocolError(
            'a request is a JSON object such as {"id": 1, "verb": "status"}, '
            f"got {_kind(document)}"
        )
    raw_id = document.get("id")
    request_id = (
        raw_id
        if isinstance(raw_id, int) and not isinstance(raw_id, bool) and abs(raw_id) <= _MAX_ID
        else None
    )
    for key in document:
        if key not in _REQUEST_KEYS:
            raise ProtocolError(
                f"request: unknown key {json.dumps(key)}{_hint(key, list(_REQUEST_KEYS))}; "
                f"expected {', '.join(_REQUEST_KEYS)}",
                request_id,
            )
    if "id" not in document:
        raise ProtocolError("request: missing id (an integer the response will carry)")
    if request_id is None:
        raise ProtocolError(f"request: id must be an integer of at most 2**53, got {_kind(raw_id)}")
    verb = document.get("verb")
    if not isinstance(verb, str):
        raise ProtocolError(
            f'request: verb must be a string such as "status", got {_kind(verb)}', request_id
        )
    schema = VERBS.get(verb)
    if schema is None:
        known = sorted(VERBS)
        raise ProtocolError(
            f"unknown verb {json.dumps(verb)}{_hint(verb, known)}; "
            f"expected one of {', '.join(known)}",
            request_id,
        )
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"{verb}: args must be an object, got {_kind(args)}", request_id)
    checked: dict[str, Any] = {}
    for name, value in args.items():
        spec = schema.get(name)
        if spec is None:
            known = sorted(schema)
            expected = f"expected {', '.join(known)}" if known else "it takes none"
            raise ProtocolError(
                f"{verb}: unknown argument {json.dumps(name)}{_hint(name, known)}; {expected}",
                request_id,
            )
        checked[name] = _check_arg(request_id, verb, name, value, spec)
    for name, spec in schema.items():
        if spec.required and name not in checked:
            raise ProtocolError(
                f"{verb}: missing argument {json.dumps(name)} ({spec.example})", request_id
            )
    return Request(request_id, verb, MappingProxyType(checked))


def _line(document: Json) -> bytes:
    # ensure_ascii: a lone surrogate (a file name that is not UTF-8) still encodes, and
    # no character can be mistaken for a line break by a reader splitting on more than LF.
    return (
        json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n"
    ).encode("ascii")


def encode_request(request_id: int, verb: str, args: Mapping[str, Any]) -> bytes:
    return _line({"id": request_id, "verb": verb, "args": dict(args)})


def encode_result(request_id: int | None, result: Any) -> bytes:
    """The success line; ``TypeError``/``ValueError`` if ``result`` is not JSON."""
    return _line({"id": request_id, "ok": True, "result": result})


def encode_error(request_id: int | None, message: str, code: ErrorCode) -> bytes:
    return _line({"id": request_id, "ok": False, "error": message, "code": code.value})


def encode_event(request_id: int, event: Json) -> bytes:
    """One monitor line; ``TypeError``/``ValueError`` if ``event`` is not JSON."""
    return _line({"id": request_id, "event": event})


def parse_response(line: bytes) -> Response:
    """A server line as the client sees it; ``ProtocolError`` if it is not one."""
    try:
        document = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(document, dict) or "id" not in document:
        raise ProtocolError("the daemon sent a line that is not a response")
    raw_id = document["id"]
    request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    if "event" in document:
        event = document["event"]
        if not isinstance(event, dict):
            raise ProtocolError("the daemon sent an event that is not an object")
        return Response(request_id, None, event=event)
    ok = document.get("ok")
    if ok is True:
        return Response(request_id, True, result=document.get("result"))
    if ok is False:
        error = document.get("error")
        code = document.get("code")
        return Response(
            request_id,
            False,
            error=error if isinstance(error, str) else "unknown error",
            code=code if isinstance(code, str) else None,
        )
    raise ProtocolError("the daemon sent a response without ok: true or false")


# Who may do what.


class Access(enum.Enum):
    FULL = "full"
    READ_ONLY = "read-only"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected client as the kernel vouches for it (SO_PEERCRED, SO_PEERGROUPS)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_access(peer: Peer, *, owner_uid: int, read_only_gid: int | None) -> Access:
    """Root, and the daemon's own user, may do everything (the latter so the daemon's
    tests run unprivileged; in production both are 0). Members of the configured group,
    by primary or supplementary gid, may use the read-only verbs. Nobody else."""
    if peer.uid in (0, owner_uid):
        return Access.FULL
    if read_only_gid is not None and (peer.gid == read_only_gid or read_only_gid in peer.groups):
        return Access.READ_ONLY
    return Access.NONE


def verb_allowed(verb: str, access: Access) -> bool:
    if access is Access.FULL:
        return True
    return access is Access.READ_ONLY and verb in READ_ONLY_VERBS


def denied_message(peer: Peer, access: Access, verb: str | None = None) -> str:
    if access is Access.NONE or verb is None:
        return (
            f"permission denied: uid {peer.uid} may not use the hotrelay control socket "
            "(root only; socket_group in hotrelay.toml can allow a group the read-only verbs)"
        )
    return (
        f"permission denied: {json.dumps(verb)} needs root; "
        f"members of the socket group may use {', '.join(sorted(READ_ONLY_VERBS))}"
    )
