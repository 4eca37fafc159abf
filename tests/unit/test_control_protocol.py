"""The control protocol, without sockets: validation, framing, access rules, fuzzing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotrelay.control.protocol import (
    MAX_LINE,
    READ_ONLY_VERBS,
    VERBS,
    Access,
    ErrorCode,
    LineBuffer,
    LineTooLong,
    Peer,
    ProtocolError,
    Request,
    denied_message,
    encode_error,
    encode_event,
    encode_request,
    encode_result,
    parse_request,
    parse_response,
    peer_access,
    verb_allowed,
)


def line(document: Any) -> bytes:
    return json.dumps(document).encode()


# Requests.


@pytest.mark.parametrize("verb", ["status", "list", "monitor", "reload"])
def test_verbs_without_arguments(verb: str) -> None:
    for document in ({"id": 1, "verb": verb}, {"id": 1, "verb": verb, "args": {}}):
        request = parse_request(line(document))
        assert request == Request(1, verb, {})


def test_attach_with_every_option() -> None:
    args = {
        "target": "lxc:ha",
        "device": "/dev/ttyUSB0",
        "path": "/dev/zigbee",
        "mode": "0660",
        "owner": "root",
        "group": 20,
    }
    request = parse_request(line({"id": 7, "verb": "attach", "args": args}))
    assert (request.id, request.verb, dict(request.args)) == (7, "attach", args)


def test_request_args_are_read_only() -> None:
    request = parse_request(
        line({"id": 1, "verb": "refresh", "args": {"runtime": "lxc", "name": "a"}})
    )
    with pytest.raises(TypeError):
        request.args["name"] = "b"  # type: ignore[index]


def test_crlf_and_surrounding_space_are_fine() -> None:
    assert parse_request(b' {"id": 2, "verb": "list"} \r').verb == "list"


def test_round_trip_through_encode_request() -> None:
    encoded = encode_request(5, "detach", {"target": "docker:z2m", "device": "/dev/ttyACM0"})
    assert encoded.endswith(b"\n")
    assert encoded.count(b"\n") == 1
    request = parse_request(encoded.rstrip(b"\n"))
    assert request == Request(5, "detach", {"target": "docker:z2m", "device": "/dev/ttyACM0"})


@pytest.mark.parametrize(
    ("raw", "message", "request_id"),
    [
        (b"\xff{}", "request is not UTF-8 (byte 0)", None),
        (
            b"{",
            "request is not valid JSON: Expecting property name enclosed in double quotes "
            "(column 2)",
            None,
        ),
        (b'{"id": NaN}', "request is not valid JSON: NaN is not valid JSON", None),
        (b"[" * 100_000, "request is not valid JSON: nested too deeply", None),
        (
            b"[1]",
            'a request is a JSON object such as {"id": 1, "verb": "status"}, got an array',
            None,
        ),
        (
            b'"status"',
            'a request is a JSON object such as {"id": 1, "verb": "status"}, got string "status"',
            None,
        ),
        (b'{"verb": "status"}', "request: missing id (an integer the response will carry)", None),
        (
            b'{"id": "1", "verb": "status"}',
            'request: id must be an integer of at most 2**53, got string "1"',
            None,
        ),
        (
            b'{"id": true, "verb": "status"}',
            "request: id must be an integer of at most 2**53, got boolean true",
            None,
        ),
        (
            b'{"id": 1.5, "verb": "status"}',
            "request: id must be an integer of at most 2**53, got number 1.5",
            None,
        ),
        (
            b'{"id": 9007199254740993, "verb": "status"}',
            "request: id must be an integer of at most 2**53, got number 9007199254740993",
            None,
        ),
        (
            b'{"id": 3, "verb": "status", "arg": {}}',
            'request: unknown key "arg" (did you mean "args"?); expected id, verb, args',
            3,
        ),
        (b'{"id": 3}', 'request: verb must be a string such as "status", got null', 3),
        (
            b'{"id": 3, "verb": 1}',
            'request: verb must be a string such as "status", got number 1',
            3,
        ),
        (
            b'{"id": 3, "verb": "stats"}',
            'unknown verb "stats" (did you mean "status"?); '
            "expected one of attach, detach, list, monitor, refresh, reload, status",
            3,
        ),
        (b'{"id": 3, "verb": "list", "args": []}', "list: args must be an object, got an array", 3),
        (
            b'{"id": 3, "verb": "list", "args": {"all": true}}',
            'list: unknown argument "all"; it takes none',
            3,
        ),
        (
            b'{"id": 4, "verb": "attach", "args": {"target": "lxc:a"}}',
            'attach: missing argument "device" (a device such as "/dev/ttyUSB0")',
            4,
        ),
        (
            b'{"id": 4, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/x", '
            b'"pth": "/y"}}',
            'attach: unknown argument "pth" (did you mean "path"?); expected '
            "device, group, mode, owner, path, target",
            4,
        ),
        (
            b'{"id": 4, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/x", '
            b'"mode": 432}}',
            'attach: argument "mode": expected an octal mode such as "0660", got number 432',
            4,
        ),
        (
            b'{"id": 4, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/x", '
            b'"owner": true}}',
            'attach: argument "owner": expected a user name or id such as '
            '"root" or 0, got boolean true',
            4,
        ),
        (
            b'{"id": 4, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/x", '
            b'"group": -1}}',
            'attach: argument "group": -1 is not a valid id (0 to 4294967295)',
            4,
        ),
        (
            b'{"id": 4, "verb": "detach", "args": {"target": "", "device": "/dev/x"}}',
            'detach: argument "target" is empty; expected a target such as "lxc:homeassistant"',
            4,
        ),
        (
            b'{"id": 4, "verb": "detach", "args": {"target": "a\\u0000", "device": "/dev/x"}}',
            'detach: argument "target" contains a NUL character',
            4,
        ),
        (
            b'{"id": 5, "verb": "refresh", "args": {"runtime": "lxc", "name": null}}',
            'refresh: argument "name": expected a container name such as "homeassistant", got null',
            5,
        ),
    ],
)
def test_invalid_requests(raw: bytes, message: str, request_id: int | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(raw)
    assert caught.value.message == message
    assert str(caught.value) == message
    assert caught.value.request_id == request_id


def test_every_verb_is_documented_in_the_schema() -> None:
    assert set(VERBS) == {"status", "list", "monitor", "reload", "attach", "detach", "refresh"}
    assert {"status", "list", "monitor"} == READ_ONLY_VERBS


# Responses.


def test_result_error_and_event_lines() -> None:
    ok = encode_result(3, {"grants": 2})
    assert json.loads(ok) == {"id": 3, "ok": True, "result": {"grants": 2}}
    failed = encode_error(None, "nope", ErrorCode.DENIED)
    assert json.loads(failed) == {"id": None, "ok": False, "error": "nope", "code": "denied"}
    event = encode_event(4, {"type": "uevent", "action": "add"})
    assert json.loads(event) == {"id": 4, "event": {"type": "uevent", "action": "add"}}
    for encoded in (ok, failed, event):
        assert encoded.endswith(b"\n")
        assert encoded.count(b"\n") == 1


def test_lines_stay_one_line_and_ascii_whatever_the_text() -> None:
    # A file name that is not UTF-8 comes through os.fsdecode as lone surrogates;
    # U+2028 is a line break to some readers.
    encoded = encode_result(1, {"path": "/dev/\udcff\u2028x\n"})
    assert encoded.isascii()
    assert encoded.count(b"\n") == 1
    assert parse_response(encoded.rstrip(b"\n")).result == {"path": "/dev/\udcff\u2028x\n"}


def test_results_that_are_not_json_are_refused() -> None:
    with pytest.raises(TypeError):
        encode_result(1, {"x": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        encode_result(1, float("nan"))


def test_parse_response() -> None:
    assert parse_response(b'{"id": 1, "ok": true, "result": [1]}').result == [1]
    failed = parse_response(b'{"id": 2, "ok": false, "error": "x", "code": "failed"}')
    assert (failed.ok, failed.error, failed.code) == (False, "x", "failed")
    event = parse_response(b'{"id": 3, "event": {"a": 1}}')
    assert (event.ok, event.event) == (None, {"a": 1})
    for bad in (b"nope", b"[]", b'{"ok": true}', b'{"id": 1}', b'{"id": 1, "event": 2}'):
        with pytest.raises(ProtocolError):
            parse_response(bad)


# Framing.


def test_line_buffer_splits_across_chunks() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b'{"id": 1, "ve') == []
    assert buffer.pending == 13
    assert buffer.feed(b'rb": "list"}\n{"id"') == [b'{"id": 1, "verb": "list"}']
    assert buffer.feed(b": 2}\r\n\n  \n") == [b'{"id": 2}']
    assert buffer.pending == 0


def test_line_buffer_takes_exactly_the_limit() -> None:
    buffer = LineBuffer(limit=10)
    assert buffer.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    assert buffer.feed(b"y" * 10 + b"\r\n") == [b"y" * 10]
    assert buffer.feed(b"z" * 10) == []


def test_line_buffer_refuses_a_line_over_the_limit_in_one_chunk() -> None:
    buffer = LineBuffer(limit=10)
    with pytest.raises(LineTooLong) as caught:
        buffer.feed(b"ok\n" + b"x" * 11 + b"\nafter\n")
    assert caught.value.complete == [b"ok"]
    with pytest.raises(LineTooLong):
        buffer.feed(b"\n")  # the connection is done for


def test_line_buffer_refuses_a_growing_line_without_waiting_for_its_end() -> None:
    buffer = LineBuffer(limit=MAX_LINE)
    for _ in range(MAX_LINE // 4096):
        assert buffer.feed(b"x" * 4096) == []
    with pytest.raises(LineTooLong) as caught:
        buffer.feed(b"xx")
    assert caught.value.complete == []
    assert buffer.pending <= MAX_LINE + 2  # it never held more than that


@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10), st.data()
)
def test_fuzz_chunking_does_not_change_the_lines(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"\n".join(parts) + b"\n"
    whole = LineBuffer(limit=1000).feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunked = LineBuffer(limit=1000)
    lines: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        lines += chunked.feed(stream[start:end])
    assert lines == whole
    assert whole == [p.removesuffix(b"\r") for p in parts if p.removesuffix(b"\r").strip()]


@given(st.binary(max_size=300))
def test_fuzz_parse_request_raises_only_protocol_errors(raw: bytes) -> None:
    outcome: Request | str
    try:
        outcome = parse_request(raw)
    except ProtocolError as exc:
        outcome = exc.message
    if isinstance(outcome, str):
        assert outcome  # every refusal says why
    else:
        assert outcome.verb in VERBS


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.one_of(st.integers(), st.text(max_size=3), st.none()),
    st.sampled_from([*VERBS, "bogus"]),
    st.dictionaries(
        st.sampled_from(
            ["target", "device", "path", "mode", "owner", "group", "runtime", "name", "x"]
        ),
        _JSON,
        max_size=4,
    ),
)
def test_fuzz_structured_requests(request_id: Any, verb: str, args: dict[str, Any]) -> None:
    raw = json.dumps({"id": request_id, "verb": verb, "args": args}).encode()
    try:
        request = parse_request(raw)
    except ProtocolError:
        return
    # Whatever got through has the types the handler is promised.
    assert isinstance(request.id, int)
    schema = VERBS[request.verb]
    assert set(request.args) <= set(schema)
    for name, spec in schema.items():
        if spec.required:
            assert name in request.args
    for name, value in request.args.items():
        assert isinstance(value, schema[name].kinds)
        assert not isinstance(value, bool)


# Who may do what.

ROOT = Peer(pid=1, uid=0, gid=0)
OWNER = Peer(pid=2, uid=1000, gid=1000)
MEMBER = Peer(pid=3, uid=1001, gid=1001, groups=frozenset({1001, 990}))
PRIMARY = Peer(pid=4, uid=1002, gid=990)
STRANGER = Peer(pid=5, uid=65534, gid=65534, groups=frozenset({65534}))


@pytest.mark.parametrize(
    ("peer", "group", "access"),
    [
        (ROOT, None, Access.FULL),
        (ROOT, 990, Access.FULL),
        (OWNER, None, Access.FULL),
        (MEMBER, 990, Access.READ_ONLY),
        (PRIMARY, 990, Access.READ_ONLY),
        (MEMBER, None, Access.NONE),
        (STRANGER, 990, Access.NONE),
        (STRANGER, None, Access.NONE),
    ],
)
def test_peer_access(peer: Peer, group: int | None, access: Access) -> None:
    assert peer_access(peer, owner_uid=1000, read_only_gid=group) is access


def test_verbs_by_access() -> None:
    for verb in VERBS:
        assert verb_allowed(verb, Access.FULL)
        assert verb_allowed(verb, Access.READ_ONLY) == (verb in READ_ONLY_VERBS)
        assert not verb_allowed(verb, Access.NONE)


def test_denied_messages() -> None:
    assert denied_message(STRANGER, Access.NONE) == (
        "permission denied: uid 65534 may not use the hotrelay control socket (root only; "
        "socket_group in hotrelay.toml can allow a group the read-only verbs)"
    )
    assert denied_message(MEMBER, Access.READ_ONLY, "attach") == (
        'permission denied: "attach" needs root; members of the socket group may use '
        "list, monitor, status"
    )
