"""A small HTTP/1.1 client over a unix socket, with trio: what the runtime APIs need.

Docker, Podman, LXD and Incus all speak HTTP on a local unix socket. We need little of
HTTP: one request per connection (``Connection: close``), bodies sent with a length,
responses framed by ``Content-Length``, ``chunked`` or end of stream, a streaming body
read line by line (Docker's and Podman's ``/events``), and the WebSocket handshake plus
a frame reader for LXD's ``/1.0/events`` (RFC 6455: client frames are masked, control
frames are answered, fragments are joined).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import trio

from hotrelay.runtimes.errors import RuntimeApiError, RuntimeUnavailable

__all__ = [
    "HttpStatusError",
    "Response",
    "StreamingResponse",
    "UnixHttpClient",
    "WebSocket",
    "WebSocketClosed",
]

MAX_LINE = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024 * 1024
MAX_MESSAGE = 16 * 1024 * 1024
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
# Errors of writing to a peer that already went away.
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class HttpStatusError(RuntimeApiError):
    """The API answered with an error status; ``status`` is the HTTP code."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class WebSocketClosed(RuntimeApiError):
    """The WebSocket peer closed the connection (or the stream ended)."""


class _Reader:
    """Buffered reads from a byte stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            self.eof = True
            return False
        self._buffer += chunk
        return True

    async def read_line(self, limit: int = MAX_LINE) -> bytes:
        """One line without its CRLF (or LF); raises at EOF or beyond ``limit``."""
        start = 0
        while True:
            index = self._buffer.find(b"\n", start)
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                return line.removesuffix(b"\r")
            if len(self._buffer) > limit:
                raise RuntimeApiError(f"line longer than {limit} bytes")
            start = len(self._buffer)
            if not await self._fill():
                raise RuntimeApiError("connection closed in the middle of a line")

    async def read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not await self._fill():
                raise RuntimeApiError(f"connection closed {count - len(self._buffer)} bytes early")
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def read_some(self) -> bytes:
        """What is buffered, or the next chunk; b"" at EOF."""
        if not self._buffer and not await self._fill():
            return b""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: Mapping[str, str] = field(hash=False)
    body: bytes = b""

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise RuntimeApiError(f"response is not JSON: {exc}: {self.body[:200]!r}") from None


def _error_message(body: bytes) -> str:
    """Docker says {"message": ...}, LXD {"error": ...}; else the raw text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500]
    if isinstance(data, dict):
        for key in ("message", "error", "cause"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    return body.decode(errors="replace").strip()[:500]


async def _read_head(reader: _Reader) -> tuple[int, str, dict[str, str]]:
    status_line = (await reader.read_line()).decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise RuntimeApiError(f"not an HTTP response: {status_line[:100]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = (await reader.read_line()).decode("latin-1")
        if not line:
            return int(code), reason, headers
        name, sep, value = line.partition(":")
        if not sep:
            raise RuntimeApiError(f"malformed header line {line[:100]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    raise RuntimeApiError(f"more than {MAX_HEADERS} header lines")


class _Body:
    """A response body as it arrives, with the HTTP framing removed."""

    def __init__(self, reader: _Reader, headers: Mapping[str, str], *, no_body: bool) -> None:
        self._reader = reader
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._remaining: int | None = None
        self._done = no_body
        if not self._chunked and "content-length" in headers:
            length_text = headers["content-length"]
            if not length_text.isdigit():
                raise RuntimeApiError(f"bad Content-Length {length_text!r}")
            self._remaining = int(length_text)

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        if self._done:
            return b""
        if self._chunked:
            return await self._next_http_chunk()
        if self._remaining is not None:
            if self._remaining == 0:
                self._done = True
                return b""
            data = await self._reader.read_some()
            if not data:
                raise RuntimeApiError(f"connection closed {self._remaining} bytes early")
            if len(data) > self._remaining:
                raise RuntimeApiError("more bytes than Content-Length")
            self._remaining -= len(data)
            return data
        data = await self._reader.read_some()
        self._done = not data
        return data

    async def _next_http_chunk(self) -> bytes:
        size_line = (await self._reader.read_line()).decode("latin-1")
        size_text = size_line.partition(";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise RuntimeApiError(f"bad chunk size {size_line[:40]!r}") from None
        if size == 0:
            while await self._reader.read_line():  # trailers, up to the empty line
                pass
            self._done = True
            return b""
        if size > MAX_BODY:
            raise RuntimeApiError(f"chunk of {size} bytes is too large")
        data = await self._reader.read_exactly(size)
        if await self._reader.read_line():
            raise RuntimeApiError("chunk not followed by CRLF")
        return data

    async def read_all(self, limit: int = MAX_BODY) -> bytes:
        parts = []
        size = 0
        while chunk := await self.next_chunk():
            size += len(chunk)
            if size > limit:
                raise RuntimeApiError(f"body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class StreamingResponse:
    """A response whose body is read as it arrives (event streams)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str], body: _Body) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._body = body
        self._pending = bytearray()
        self._ended = False

    async def next_line(self, limit: int = MAX_LINE * 16) -> bytes | None:
        """The next non-empty body line without its newline; None at the end."""
        while True:
            index = self._pending.find(b"\n")
            if index >= 0:
                line = bytes(self._pending[:index]).strip()
                del self._pending[: index + 1]
                if line:
                    return line
                continue
            if self._ended:
                line = bytes(self._pending).strip()
                self._pending.clear()
                return line or None
            if len(self._pending) > limit:
                raise RuntimeApiError(f"stream line longer than {limit} bytes")
            chunk = await self._body.next_chunk()
            if chunk:
                self._pending += chunk
            else:
                self._ended = True

    async def next_json(self) -> Any:
        """The next newline-separated JSON value (Docker/Podman events); None at the end."""
        line = await self.next_line()
        if line is None:
            return None
        try:
            return json.loads(line)
        except ValueError as exc:
            raise RuntimeApiError(f"event stream line is not JSON: {exc}") from None


class WebSocket:
    """The client end of a WebSocket (RFC 6455) over an upgraded HTTP connection."""

    def __init__(self, stream: trio.SocketStream, reader: _Reader) -> None:
        self._stream = stream
        self._reader = reader
        self._closed = False

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        # Clients must mask every frame (RFC 6455 5.3).
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self._stream.send_all(head + mask + masked)

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = await self._reader.read_exactly(2)
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._reader.read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._reader.read_exactly(8))
        if length > MAX_MESSAGE:
            raise RuntimeApiError(f"WebSocket frame of {length} bytes is too large")
        mask = await self._reader.read_exactly(4) if second & 0x80 else None
        payload = await self._reader.read_exactly(length)
        if mask is not None:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return fin, opcode, payload

    async def receive(self) -> str | bytes:
        """The next data message (text as str); raises WebSocketClosed at the end."""
        if self._closed:
            raise WebSocketClosed("WebSocket is closed")
        parts: list[bytes] = []
        message_opcode: int | None = None
        while True:
            try:
                fin, opcode, payload = await self._read_frame()
            except RuntimeApiError:
                if self._reader.eof:
                    self._closed = True
                    raise WebSocketClosed("WebSocket stream ended without a close frame") from None
                raise
            if opcode == OP_PING:
                await self._send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self._closed = True
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(*_PEER_GONE):
                    await self._send_frame(OP_CLOSE, payload[:2])
                raise WebSocketClosed(f"WebSocket closed by peer (code {code})")
            if opcode in (OP_TEXT, OP_BINARY):
                if message_opcode is not None:
                    raise RuntimeApiError("WebSocket data frame inside a fragmented message")
                message_opcode = opcode
            elif opcode != OP_CONTINUATION or message_opcode is None:
                raise RuntimeApiError(f"unexpected WebSocket opcode {opcode:#x}")
            parts.append(payload)
            if sum(len(p) for p in parts) > MAX_MESSAGE:
                raise RuntimeApiError("WebSocket message too large")
            if fin:
                data = b"".join(parts)
                if message_opcode == OP_TEXT:
                    try:
                        return data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise RuntimeApiError("WebSocket text message is not UTF-8") from None
                return data

    async def receive_json(self) -> Any:
        message = await self.receive()
        try:
            return json.loads(message)
        except ValueError as exc:
            raise RuntimeApiError(f"WebSocket message is not JSON: {exc}") from None

    async def send_text(self, text: str) -> None:
        await self._send_frame(OP_TEXT, text.encode())

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(*_PEER_GONE):
                await self._send_frame(OP_CLOSE, struct.pack("!H", 1000))
        await self._stream.aclose()


class UnixHttpClient:
    """HTTP requests to a server on a unix socket; one connection per request."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"UnixHttpClient({self.socket_path!r})"

    async def _connect(self) -> trio.SocketStream:
        try:
            return await trio.open_unix_socket(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeUnavailable(
                f"{self.socket_path}: {exc.strerror or exc} (is the daemon running?)"
            ) from None

    @staticmethod
    def _request_bytes(
        method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "User-Agent: hotrelay"]
        extra = {k.lower(): (k, v) for k, v in (headers or {}).items()}
        if "connection" not in extra:
            lines.append("Connection: close")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in extra.values()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request and read the whole response (bounded by ``MAX_BODY``)."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        with trio.fail_after(self.timeout):
            stream = await self._connect()
            async with stream:
                await stream.send_all(self._request_bytes(method, path, body, headers))
                reader = _Reader(stream)
                status, reason, response_headers = await _read_head(reader)
                no_body = method == "HEAD" or status in (204, 304)
                body_bytes = await _Body(reader, response_headers, no_body=no_body).read_all()
        return Response(status, reason, MappingProxyType(response_headers), body_bytes)

    async def get_json(self, path: str) -> Any:
        """GET a JSON document; an error status raises HttpStatusError."""
        response = await self.request("GET", path)
        if response.status >= 400:
            raise HttpStatusError("GET", path, response.status, _error_message(response.body))
        return response.json()

    @asynccontextmanager
    async def stream(self, method: str, path: str) -> AsyncIterator[StreamingResponse]:
        """A request whose response body is consumed as it arrives.

        Only connecting and the response head are under the timeout; the body may take
        forever (event streams). An error status raises HttpStatusError.
        """
        with trio.fail_after(self.timeout):
            stream = await self._connect()
        async with stream:
            with trio.fail_after(self.timeout):
                await stream.send_all(self._request_bytes(method, path, None, None))
                reader = _Reader(stream)
                status, reason, headers = await _read_head(reader)
            body = _Body(reader, headers, no_body=False)
            if status >= 400:
                with trio.fail_after(self.timeout):
                    message = _error_message(await body.read_all())
                raise HttpStatusError(method, path, status, message)
            yield StreamingResponse(status, reason, headers, body)

    @asynccontextmanager
    async def websocket(self, path: str) -> AsyncIterator[WebSocket]:
        """Upgrade a GET of ``path`` to a WebSocket (RFC 6455 section 4.1)."""
        key = base64.b64encode(os.urandom(16)).decode()
        with trio.fail_after(self.timeout):
            stream = await self._connect()
        try:
            with trio.fail_after(self.timeout):
                await stream.send_all(
                    self._request_bytes(
                        "GET",
                        path,
                        None,
                        {
                            "Connection": "Upgrade",
                            "Upgrade": "websocket",
                            "Sec-WebSocket-Version": "13",
                            "Sec-WebSocket-Key": key,
                        },
                    )
                )
                reader = _Reader(stream)
                status, _, headers = await _read_head(reader)
            if status != 101:
                body = await _Body(reader, headers, no_body=status in (204, 304)).read_all()
                raise HttpStatusError("GET", path, status, _error_message(body))
            expected = base64.b64encode(
                hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()
            ).decode()
            if headers.get("sec-websocket-accept") != expected:
                raise RuntimeApiError(f"GET {path}: bad Sec-WebSocket-Accept in the upgrade")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        socket = WebSocket(stream, reader)
        try:
            yield socket
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await socket.aclose()
            await trio.aclose_forcefully(stream)
