"""A small synchronous client for the control socket (the CLI is not async).

    with ControlClient("/run/hotrelay/control.sock") as client:
        client.request("attach", target="lxc:ha", device="/dev/ttyUSB0", mode="0660")
        for event in client.stream("monitor"):
            ...

Errors are ``HotrelayError``s with messages meant for the operator:
``DaemonNotRunningError`` (no socket, or nothing listening on it),
``ControlPermissionError`` (the socket file or the daemon said no) and ``ControlError``
(everything else, including the daemon's own ``ok: false`` answers).
"""

from __future__ import annotations

import errno
import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from hotrelay.control.protocol import ProtocolError, Response, encode_request, parse_response
from hotrelay.core.config import DEFAULT_SOCKET
from hotrelay.errors import HotrelayError

__all__ = ["ControlClient", "ControlError", "ControlPermissionError", "DaemonNotRunningError"]

# Responses are not limited by the protocol (a status of many containers can be big);
# this only stops a broken peer from filling our memory.
MAX_RESPONSE = 64 * 1024 * 1024


class ControlError(HotrelayError):
    """The request failed; ``code`` is the daemon's error code when it answered."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class DaemonNotRunningError(ControlError):
    exit_code = 3


class ControlPermissionError(ControlError):
    exit_code = 2


class ControlClient:
    def __init__(self, path: str | Path = DEFAULT_SOCKET, *, timeout: float | None = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            why = "no socket" if isinstance(exc, FileNotFoundError) else "nothing listens"
            raise DaemonNotRunningError(
                f"the hotrelay daemon is not running ({why} at {self.path}; "
                "systemctl status hotrelay)"
            ) from None
        except PermissionError:
            sock.close()
            raise ControlPermissionError(
                f"permission denied: {self.path} (the control socket is for root, and "
                "for members of socket_group with status, list and monitor)"
            ) from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        self._sock = sock

    def request(self, verb: str, /, **args: Any) -> Any:
        """Send one request and return its result; arguments given as None are left out."""
        request_id = self._send(verb, args)
        response = self._receive()
        if response.ok is None:
            raise ControlError("the daemon sent an event where an answer was expected")
        self._check(response, request_id)
        return response.result

    def stream(self, verb: str = "monitor", /, **args: Any) -> Iterator[dict[str, Any]]:
        """Send a streaming request and yield its events until the daemon ends the stream."""
        request_id = self._send(verb, args)
        self._check(self._receive(), request_id)
        assert self._sock is not None
        self._sock.settimeout(None)  # events come when they come
        while True:
            try:
                response = self._receive()
            except ControlError as exc:
                if exc.code == "closed":
                    return
                raise
            if response.event is not None:
                yield response.event
            elif response.ok is False:
                raise ControlError(response.error or "stream failed", response.code)

    def _send(self, verb: str, args: dict[str, Any]) -> int:
        self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        line = encode_request(
            request_id, verb, {key: value for key, value in args.items() if value is not None}
        )
        try:
            self._sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have said why before closing (a refused peer): read that.
            self._receive()
            raise ControlError("the daemon closed the connection") from None
        except TimeoutError:
            raise ControlError(f"timed out sending to {self.path}") from None
        return request_id

    def _receive(self) -> Response:
        assert self._sock is not None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                break
            if len(self._buffer) > MAX_RESPONSE:
                raise ControlError(f"the daemon sent a line over {MAX_RESPONSE} bytes")
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the daemon did not answer within {self.timeout} seconds"
                ) from None
            except OSError as exc:
                if exc.errno != errno.ECONNRESET:
                    raise ControlError(f"reading from {self.path}: {exc}") from None
                data = b""
            if not data:
                raise ControlError("the daemon closed the connection", "closed")
            self._buffer += data
        try:
            response = parse_response(line)
        except ProtocolError as exc:
            raise ControlError(str(exc)) from None
        if response.ok is False and response.id is None:
            # Not an answer to a request: the connection itself was refused.
            self._raise(response)
        return response

    def _check(self, response: Response, request_id: int) -> None:
        if response.ok is False:
            self._raise(response)
        if response.id != request_id:
            raise ControlError(f"the daemon answered request {response.id}, not {request_id}")

    @staticmethod
    def _raise(response: Response) -> None:
        message = response.error or "unknown error"
        if response.code == "denied":
            raise ControlPermissionError(message, response.code)
        raise ControlError(message, response.code)
