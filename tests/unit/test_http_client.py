"""The trio HTTP-over-unix-socket client, against a server written here byte by byte.

The server side is deliberately hand-rolled (no shared code with the client): request
heads are split by hand, responses and WebSocket frames are literal bytes, so a bug
in the client's framing cannot be mirrored by the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from hotrelay.runtimes.errors import RuntimeApiError, RuntimeUnavailable
from hotrelay.runtimes.http import HttpStatusError, UnixHttpClient, WebSocketClosed

Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


@asynccontextmanager
async def serve(path: Path, handler: Handler) -> AsyncIterator[list[bytes]]:
    """Serve ``handler`` on a unix socket; yields the list of request heads seen."""
    heads: list[bytes] = []
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    listener = trio.SocketListener(sock)

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            head = await read_head(stream)
            heads.append(head)
            await handler(stream, head)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, [listener])
        yield heads
        nursery.cancel_scope.cancel()


async def send_slowly(stream: trio.SocketStream, data: bytes, step: int = 7) -> None:
    """Send in small pieces so the client sees every boundary case."""
    for i in range(0, len(data), step):
        await stream.send_all(data[i : i + step])
        await trio.lowlevel.checkpoint()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_content_length_json(tmp_path: Path) -> None:
    body = json.dumps({"Id": "abc", "State": {"Pid": 42}}).encode()

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await send_slowly(
            stream,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )

    async with serve(tmp_path / "s", handler) as heads:
        client = UnixHttpClient(tmp_path / "s")
        assert await client.get_json("/containers/abc/json") == {"Id": "abc", "State": {"Pid": 42}}
    request_line, *headers = heads[0].decode().split("\r\n")
    assert request_line == "GET /containers/abc/json HTTP/1.1"
    assert "Host: localhost" in headers
    assert "Connection: close" in headers


async def test_chunked_body_split_anywhere(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await send_slowly(
            stream,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(b'{"metadata": ', b"[1, 2, ", b"3]}"),
            step=3,
        )

    async with serve(tmp_path / "s", handler):
        assert await UnixHttpClient(tmp_path / "s").get_json("/1.0") == {"metadata": [1, 2, 3]}


async def test_body_until_end_of_stream(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\n[true]")

    async with serve(tmp_path / "s", handler):
        response = await UnixHttpClient(tmp_path / "s").request("GET", "/")
    assert (response.status, response.json()) == (200, [True])


async def test_error_status_carries_the_api_message(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        body = b'{"message":"No such container: nope"}'
        await stream.send_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async with serve(tmp_path / "s", handler):
        with pytest.raises(HttpStatusError, match="HTTP 404: No such container: nope") as info:
            await UnixHttpClient(tmp_path / "s").get_json("/containers/nope/json")
    assert info.value.status == 404


async def test_post_sends_a_json_body(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with serve(tmp_path / "s", handler) as heads:
        response = await UnixHttpClient(tmp_path / "s").request("POST", "/x", json_body={"a": 1})
    assert response.status == 204
    assert b"Content-Length: 8\r\n" in heads[0]
    assert heads[0].endswith(b'\r\n\r\n{"a": 1}')


async def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="is the daemon running"):
        await UnixHttpClient(tmp_path / "absent.sock").get_json("/")


async def test_malformed_response_is_an_api_error(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with serve(tmp_path / "s", handler):
        with pytest.raises(RuntimeApiError, match="not an HTTP response"):
            await UnixHttpClient(tmp_path / "s").get_json("/")


async def test_event_stream_lines_across_chunks(tmp_path: Path) -> None:
    events = [{"Action": "start", "n": i} for i in range(3)]
    text = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    release = trio.Event()

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        # One event split over two chunks, then two in one chunk: framing is not lines.
        await stream.send_all(chunked(text[:10], text[10:]).removesuffix(b"0\r\n\r\n"))
        await release.wait()
        await stream.send_all(b"0\r\n\r\n")

    async with serve(tmp_path / "s", handler):
        client = UnixHttpClient(tmp_path / "s")
        async with client.stream("GET", "/events") as response:
            got = [await response.next_json() for _ in events]
            release.set()
            assert await response.next_json() is None
    assert got == events


# -- WebSocket --------------------------------------------------------------------------


def accept_for(head: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + guid).digest())


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return bytes([first, len(payload)]) + payload
    return bytes([first, 126]) + struct.pack("!H", len(payload)) + payload


async def read_client_frame(stream: trio.SocketStream) -> tuple[int, bytes, bool]:
    data = b""
    while len(data) < 6:
        data += await stream.receive_some(1024)
    opcode, length, masked = data[0] & 0x0F, data[1] & 0x7F, bool(data[1] & 0x80)
    while len(data) < 6 + length:
        data += await stream.receive_some(1024)
    mask, payload = data[2:6], data[6 : 6 + length]
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(payload)), masked


async def test_websocket_messages_fragments_ping_and_close(tmp_path: Path) -> None:
    big = json.dumps({"type": "lifecycle", "pad": "x" * 300}).encode()
    pong: list[tuple[int, bytes, bool]] = []

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        assert head.startswith(b"GET /1.0/events?type=lifecycle HTTP/1.1\r\n")
        assert b"Upgrade: websocket\r\n" in head
        assert b"Sec-WebSocket-Version: 13\r\n" in head
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_for(head)
            + b"\r\n\r\n"
            # The first frame arrives in the same packet as the head.
            + frame(0x1, b'{"n": 1}')
        )
        await send_slowly(stream, frame(0x1, b'{"n": ', fin=False) + frame(0x0, b"2}"))
        await stream.send_all(frame(0x9, b"are you there"))
        pong.append(await read_client_frame(stream))
        await stream.send_all(frame(0x1, big))
        await stream.send_all(frame(0x8, struct.pack("!H", 1001)))
        await read_client_frame(stream)  # the client's close answer

    async with serve(tmp_path / "s", handler):
        client = UnixHttpClient(tmp_path / "s")
        async with client.websocket("/1.0/events?type=lifecycle") as websocket:
            assert await websocket.receive_json() == {"n": 1}
            assert await websocket.receive_json() == {"n": 2}
            assert (await websocket.receive_json())["pad"] == "x" * 300
            with pytest.raises(WebSocketClosed, match="code 1001"):
                await websocket.receive()
    # The pong echoes the ping's payload, masked as every client frame must be.
    assert pong == [(0xA, b"are you there", True)]


async def test_websocket_rejects_a_wrong_accept_key(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
        )

    async with serve(tmp_path / "s", handler):
        with pytest.raises(RuntimeApiError, match="Sec-WebSocket-Accept"):
            async with UnixHttpClient(tmp_path / "s").websocket("/1.0/events"):
                pass


async def test_websocket_refused_upgrade_is_an_http_error(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        body = b'{"error":"not authorized","error_code":403}'
        await stream.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async with serve(tmp_path / "s", handler):
        with pytest.raises(HttpStatusError, match="403: not authorized"):
            async with UnixHttpClient(tmp_path / "s").websocket("/1.0/events"):
                pass


async def test_websocket_stream_end_without_close_frame(tmp_path: Path) -> None:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: "
            + accept_for(head)
            + b"\r\n\r\n"
        )

    async with (
        serve(tmp_path / "s", handler),
        UnixHttpClient(tmp_path / "s").websocket("/") as websocket,
    ):
        with pytest.raises(WebSocketClosed, match="without a close frame"):
            await websocket.receive()
