"""The helpers' wire protocol: every message round-trips, nothing else decodes, and
no message can outgrow the receiver's buffer (no root needed)."""

from __future__ import annotations

import json

import pytest

from hotrelay.effectors.nshelper import protocol
from hotrelay.effectors.nshelper.protocol import (
    MAX_MESSAGE,
    QUOTE_LIMIT,
    BindNode,
    Created,
    Existence,
    Exists,
    Failure,
    Forked,
    ForkHelper,
    MakeNode,
    MakeSymlink,
    Ping,
    Pong,
    ProtocolError,
    Removed,
    RemoveNode,
    RemoveSymlink,
    RouteSocket,
    SendUevent,
    Sent,
    Socket,
    decode_reply,
    decode_request,
    encode,
    quote,
)

REQUESTS = [
    Ping(),
    MakeNode("/dev/zigbee", "c", 188, 0, 0o660, 100000, 100020, 100000, 100000),
    BindNode("/dev/a/b", "b", 253, 7, 100000, 100000),
    MakeSymlink("/dev/serial/by-id/x", "../../zigbee", 0, 0),
    RemoveNode("/dev/a/b", "b", 253, 7, "bind", ("/dev/a",)),
    RemoveSymlink("/dev/serial/by-id/x", "../../zigbee", ()),
    Exists("/run/udev/control"),
    SendUevent("kernel", b"add@/devices\0ACTION=add\0".hex(), 0, 0),
    RouteSocket(),
    ForkHelper("lxc:ha", True),
]
REPLIES = [
    Pong(42),
    Created(("/dev/a", "/dev/a/b")),
    Removed(("/dev/x",), (("/dev/y", "is now a directory; left alone"),), 3),
    Existence(True),
    Sent(),
    Socket(),
    Forked(7),
    Failure("unsafe", "no", "/dev/x", 40),
    Failure("internal", "boom"),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: m.op)
def test_requests_round_trip(message: protocol.Request) -> None:
    assert decode_request(encode(message)) == message


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: m.op)
def test_replies_round_trip(message: protocol.Reply) -> None:
    assert decode_reply(encode(message)) == message


def test_requests_are_not_replies_and_back() -> None:
    with pytest.raises(ProtocolError, match="unknown op"):
        decode_reply(encode(Ping()))
    with pytest.raises(ProtocolError, match="unknown op"):
        decode_request(encode(Pong(1)))


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"op": "exists"}', "missing field path"),
        (b'{"op": "exists", "path": 1}', "wrong type"),
        (b'{"op": "exists", "path": "/x", "extra": 1}', "unknown fields"),
        (b'{"op": "make_node", "path": "/dev/x", "kind": "b", "major": true, "minor": 0, '
         b'"mode": 0, "uid": 0, "gid": 0, "dir_uid": 0, "dir_gid": 0}', "wrong type"),
        (b'{"op": "remove_symlink", "path": "/dev/x", "target": "y", "dirs": [1]}', "wrong type"),
    ],
)  # fmt: skip
def test_anything_else_is_a_protocol_error(raw: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_request(raw)


def test_no_message_may_exceed_the_limit_either_way() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Exists("/dev/" + "x" * MAX_MESSAGE))
    big = json.dumps({"op": "exists", "path": "x" * MAX_MESSAGE}).encode()
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_request(big)


def test_container_text_is_quoted_short() -> None:
    planted = "/" + "a" * 4094  # a symlink target at PATH_MAX
    shown = quote(planted)
    assert len(shown) < QUOTE_LIMIT + 40
    assert "4095 characters" in shown
    assert quote("short") == "'short'"
