"""The control server on a real unix socket, with a handler that records what it is asked.

Runs unprivileged: the server gives its own uid full access (in production that is
root), so these tests exercise everything but the refusal of other users, which
tests/privileged/test_control_peercred.py covers with real non-root peers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from hotrelay.control.client import (
    ControlClient,
    ControlError,
    ControlPermissionError,
    DaemonNotRunningError,
)
from hotrelay.control.protocol import MAX_LINE, ControlHandler
from hotrelay.control.server import (
    Broadcaster,
    ControlServer,
    ControlSettings,
    ControlSocketError,
    activation_socket,
    bind_control_socket,
    serve_control,
)
from hotrelay.control_cli import (
    add_control_verbs,
    add_daemon_monitor_options,
    default_socket,
    render,
    run_control_verb,
    run_daemon_monitor,
)
from hotrelay.core.config import Config
from hotrelay.errors import HotrelayError

ROOT = Path(__file__).resolve().parents[2]
GRANT = {
    "container": "lxc:ha",
    "device": "/dev/ttyUSB0",
    "path": "/dev/zigbee",
    "since": 1700000000.0,
}


class RecordingHandler:
    """A stand-in for the daemon: records calls, answers from canned data."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.feed = Broadcaster(buffer=100_000)
        self.release = trio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.padding = ""

    def status(self) -> dict[str, Any]:
        self.calls.append(("status",))
        status: dict[str, Any] = {"uptime": 3725.5, "source": "udev", "counters": {"events": 3}}
        if self.padding:
            status["padding"] = self.padding
        return status

    def grants(self) -> list[dict[str, Any]]:
        self.calls.append(("list",))
        return [GRANT]

    async def attach(self, target: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("attach", target, device, options))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if device == "/dev/slow":
                await self.release.wait()
            await trio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return {"container": target, "device": device, **options}

    async def detach(self, target: str, device: str) -> dict[str, Any]:
        self.calls.append(("detach", target, device))
        raise HotrelayError(f"{target} has no grant for {device}")

    async def reload(self) -> dict[str, Any]:
        self.calls.append(("reload",))
        raise RuntimeError("a bug in reload")

    async def refresh(self, runtime: str, name: str) -> dict[str, Any]:
        self.calls.append(("refresh", runtime, name))
        return {"scheduled": True}

    def subscribe(self) -> Any:
        self.calls.append(("subscribe",))
        return self.feed.subscribe()


def _typed(handler: RecordingHandler) -> ControlHandler:
    return handler  # mypy checks here that the stand-in has the daemon's interface


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory short enough for a unix socket path (108 bytes at most)."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="hr-"))
    try:
        yield short
    finally:
        for child in short.iterdir():
            child.unlink()
        short.rmdir()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@asynccontextmanager
async def running(
    handler: RecordingHandler, settings: ControlSettings, listener: socket.socket | None = None
) -> AsyncIterator[ControlServer]:
    async with trio.open_nursery() as nursery:
        server: ControlServer = await nursery.start(
            lambda task_status: serve_control(
                _typed(handler), settings, listener=listener, task_status=task_status
            )
        )
        yield server
        nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds; fail after 5 seconds."""
    with trio.fail_after(5):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


class LineClient:
    """A raw async client: JSON lines in and out, nothing hidden."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, path: Path) -> LineClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes | dict[str, Any]) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n"
        await self.stream.send_all(raw)

    async def receive(self) -> dict[str, Any] | None:
        """The next line as JSON, or None when the server closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        document: dict[str, Any] = json.loads(line)
        return document

    async def call(self, request_id: int, verb: str, **args: Any) -> dict[str, Any]:
        await self.send({"id": request_id, "verb": verb, "args": args})
        answer = await self.receive()
        assert answer is not None
        return answer


# Requests and answers.


async def test_requests_and_answers(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        assert await client.call(1, "status") == {
            "id": 1,
            "ok": True,
            "result": {"uptime": 3725.5, "source": "udev", "counters": {"events": 3}},
        }
        assert await client.call(2, "list") == {"id": 2, "ok": True, "result": [GRANT]}
        assert await client.call(
            3, "attach", target="lxc:ha", device="/dev/ttyUSB0", mode="0660", owner=0
        ) == {
            "id": 3,
            "ok": True,
            "result": {"container": "lxc:ha", "device": "/dev/ttyUSB0", "mode": "0660", "owner": 0},
        }
        assert await client.call(4, "refresh", runtime="lxc", name="web") == {
            "id": 4,
            "ok": True,
            "result": {"scheduled": True},
        }
        await client.aclose()
    assert handler.calls == [
        ("status",),
        ("list",),
        ("attach", "lxc:ha", "/dev/ttyUSB0", {"mode": "0660", "owner": 0}),
        ("refresh", "lxc", "web"),
    ]


async def test_errors_are_answered_and_the_server_carries_on(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        # The handler's own error: its message, code "failed".
        assert await client.call(1, "detach", target="lxc:ha", device="/dev/x") == {
            "id": 1,
            "ok": False,
            "error": "lxc:ha has no grant for /dev/x",
            "code": "failed",
        }
        # A bug in the handler: reported as internal, logged, and the server lives on.
        answer = await client.call(2, "reload")
        assert answer == {
            "id": 2,
            "ok": False,
            "error": "internal error: RuntimeError: a bug in reload (details in the daemon's log)",
            "code": "internal",
        }
        # Malformed JSON: an error without an id, and the connection stays usable.
        await client.send(b'{"id": 3, "verb": \n')
        assert await client.receive() == {
            "id": None,
            "ok": False,
            "error": "request is not valid JSON: Expecting value (column 19)",
            "code": "invalid",
        }
        assert (await client.call(4, "bogus"))["code"] == "invalid"
        assert (await client.call(5, "attach", target="lxc:ha"))["error"] == (
            'attach: missing argument "device" (a device such as "/dev/ttyUSB0")'
        )
        assert (await client.call(6, "status"))["ok"] is True
        await client.aclose()


async def test_requests_on_one_connection_are_answered_in_order(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        pipelined = b"".join(
            json.dumps({"id": i, "verb": verb, "args": args}).encode() + b"\n"
            for i, (verb, args) in enumerate(
                [
                    ("attach", {"target": "lxc:a", "device": "/dev/a"}),
                    ("status", {}),
                    ("attach", {"target": "lxc:b", "device": "/dev/b"}),
                    ("list", {}),
                ]
            )
        )
        await client.send(pipelined)
        ids = []
        for _ in range(4):
            answer = await client.receive()
            assert answer is not None
            ids.append(answer["id"])
        assert ids == [0, 1, 2, 3]
        await client.aclose()


# The socket file.


async def test_socket_file_is_private_and_removed_on_exit(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "run" / "control.sock"
    async with running(handler, ControlSettings(path)) as server:
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert server.path == path
    assert not path.exists()
    assert path.parent.exists()


async def test_a_stale_socket_is_replaced(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # left behind by a daemon that died: nothing listens
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        assert (await client.call(1, "status"))["ok"] is True
        await client.aclose()


async def test_a_live_socket_is_not_taken_over(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        with pytest.raises(ControlSocketError, match="another process is listening on it"):
            await trio.to_thread.run_sync(lambda: bind_control_socket(path))
        client = await LineClient.connect(path)
        assert (await client.call(1, "status"))["ok"] is True
        await client.aclose()


def test_something_else_at_the_path_is_not_removed(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="exists and is not a socket; not replacing it"):
        bind_control_socket(path)
    assert path.read_text() == "precious"


async def test_a_pre_bound_listener_is_served_and_left_in_place(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    # What systemd socket activation hands over: the daemon must not remove it.
    path = socket_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    async with running(handler, ControlSettings(socket_dir / "unused.sock"), listener):
        client = await LineClient.connect(path)
        assert (await client.call(1, "list"))["result"] == [GRANT]
        await client.aclose()
    assert path.exists()
    assert not (socket_dir / "unused.sock").exists()


def test_activation_socket_from_systemd(socket_dir: Path) -> None:
    """sd_listen_fds(3) in a real child: fd 3, LISTEN_PID, LISTEN_FDS, variables removed."""
    path = socket_dir / "activated.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        # The child puts the socket where systemd would (fd 3) before looking for it.
        child = (
            "import json, os, socket, sys\n"
            "os.dup2(int(sys.argv[1]), 3)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "from hotrelay.control.server import activation_socket\n"
            "sock = activation_socket()\n"
            "left = sorted(k for k in os.environ if k.startswith('LISTEN'))\n"
            "print(json.dumps([sock.getsockname(), sock.type == socket.SOCK_STREAM,\n"
            "    sock.get_inheritable(), left]))\n"
        )
        fd = listener.fileno()
        result = subprocess.run(
            [sys.executable, "-c", child, str(fd)],
            pass_fds=(fd,),
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"},
            capture_output=True,
            text=True,
            check=True,
        )
    assert json.loads(result.stdout) == [str(path), True, False, []]


def test_activation_socket_is_none_without_systemd() -> None:
    assert activation_socket({}) is None
    other = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert activation_socket(other) is None
    assert other == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}  # not ours: untouched
    too_many = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    with pytest.raises(ControlSocketError, match="systemd passed 2 sockets"):
        activation_socket(too_many)


# Many clients, slow clients, stalled clients.


async def test_a_hundred_concurrent_clients(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    answers: dict[int, list[dict[str, Any]]] = {}

    async def one_client(n: int) -> None:
        client = await LineClient.connect(path)
        await client.send(
            b"".join(
                json.dumps(request).encode() + b"\n"
                for request in (
                    {"id": 1, "verb": "status"},
                    {
                        "id": 2,
                        "verb": "attach",
                        "args": {"target": f"lxc:c{n}", "device": "/dev/x"},
                    },
                    {"id": 3, "verb": "list"},
                )
            )
        )
        received = []
        for _ in range(3):
            answer = await client.receive()
            assert answer is not None
            received.append(answer)
        answers[n] = received
        await client.aclose()

    async with running(handler, ControlSettings(path)) as server:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(one_client, n)
        assert server.refused == 0
    assert len(answers) == 100
    for n, received in answers.items():
        assert [a["id"] for a in received] == [1, 2, 3]
        assert all(a["ok"] for a in received)
        assert received[1]["result"]["container"] == f"lxc:c{n}"
    # Each connection has its own task: the handler saw attaches overlapping.
    assert handler.max_in_flight > 1


async def test_too_many_clients_are_told_so(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path, max_clients=2)) as server:
        first, second = await LineClient.connect(path), await LineClient.connect(path)
        assert (await first.call(1, "status"))["ok"] is True
        assert (await second.call(1, "status"))["ok"] is True
        third = await LineClient.connect(path)
        assert await third.receive() == {
            "id": None,
            "ok": False,
            "error": "too many control clients (at most 2); try again later",
            "code": "busy",
        }
        assert await third.receive() is None
        assert server.refused == 1
        for client in (first, second, third):
            await client.aclose()


async def test_a_line_of_exactly_the_limit_is_accepted(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    request = b'{"id": 1, "verb": "status"}'
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        await client.send(request + b" " * (MAX_LINE - len(request)) + b"\n")
        answer = await client.receive()
        assert answer is not None
        assert answer["ok"] is True
        await client.aclose()


async def test_a_huge_request_is_refused_and_the_connection_closed(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        client = await LineClient.connect(path)
        # No newline ever comes: the server must not wait for one, nor buffer it all.
        with trio.move_on_after(5):
            try:
                for _ in range(64):
                    await client.send(b"x" * 4096)
                await client.send(b"x" * 4096)
            except trio.BrokenResourceError:
                pass  # the server already hung up
        assert await client.receive() == {
            "id": None,
            "ok": False,
            "error": f"request line longer than {MAX_LINE} bytes; closing the connection",
            "code": "invalid",
        }
        assert await client.receive() is None
        await client.aclose()
        # Others are fine.
        other = await LineClient.connect(path)
        assert (await other.call(1, "status"))["ok"] is True
        await other.aclose()


async def test_a_slow_request_does_not_hold_up_other_clients(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        slow = await LineClient.connect(path)
        await slow.send(
            {"id": 1, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/slow"}}
        )
        half = await LineClient.connect(path)
        await half.send(b'{"id": 1, "ve')  # and then nothing
        quick = await LineClient.connect(path)
        with trio.fail_after(5):
            assert (await quick.call(1, "status"))["ok"] is True
            assert (await quick.call(2, "list"))["ok"] is True
        handler.release.set()
        answer = await slow.receive()
        assert answer is not None
        assert answer["result"]["device"] == "/dev/slow"
        for client in (slow, half, quick):
            await client.aclose()


async def test_a_client_that_stops_reading_is_dropped(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    handler.padding = "x" * 200_000  # a few answers fill the socket buffers
    async with running(handler, ControlSettings(path, send_timeout=0.3)) as server:
        stalled = await LineClient.connect(path)
        await stalled.send(b"".join(b'{"id": %d, "verb": "status"}\n' % i for i in range(40)))
        other = await LineClient.connect(path)
        with trio.fail_after(10):
            while server.dropped == 0:
                answer = await other.call(1, "list")  # served all along
                assert answer["ok"] is True
                await trio.sleep(0.05)
        await stalled.aclose()
        await other.aclose()


# monitor


async def test_monitor_streams_events_until_the_client_leaves(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        watcher = await LineClient.connect(path)
        assert await watcher.call(9, "monitor") == {
            "id": 9,
            "ok": True,
            "result": {"subscribed": True},
        }
        assert handler.feed.subscribers == 1
        events = [{"type": "uevent", "action": "add", "seq": n} for n in range(3)]
        for event in events:
            handler.feed.publish(event)
        for event in events:
            assert await watcher.receive() == {"id": 9, "event": event}
        await watcher.aclose()
        await eventually(lambda: handler.feed.subscribers == 0)


async def test_monitor_ends_when_the_daemon_ends_the_feed(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    async with running(handler, ControlSettings(path)):
        watcher = await LineClient.connect(path)
        assert (await watcher.call(1, "monitor"))["ok"] is True
        handler.feed.publish({"last": True})
        handler.feed.close()
        assert await watcher.receive() == {"id": 1, "event": {"last": True}}
        assert await watcher.receive() is None
        await watcher.aclose()


async def test_a_monitor_client_that_never_reads_is_dropped_not_waited_for(
    socket_dir: Path, handler: RecordingHandler
) -> None:
    path = socket_dir / "control.sock"
    settings = ControlSettings(path, monitor_queue=8, send_timeout=30)
    async with running(handler, settings) as server:
        deaf = await LineClient.connect(path)
        assert (await deaf.call(1, "monitor"))["ok"] is True
        other = await LineClient.connect(path)
        event = {"type": "uevent", "payload": "y" * 8192}
        with trio.fail_after(10):
            published = 0
            while handler.feed.subscribers:
                handler.feed.publish(event)  # never blocks, whatever the client does
                published += 1
                await trio.lowlevel.checkpoint()
                if published % 100 == 0:
                    assert (await other.call(published, "status"))["ok"] is True
        assert server.dropped == 1
        assert handler.feed.dropped == 0  # the server drained the feed; it dropped the client
        assert (await other.call(1, "list"))["ok"] is True
        await deaf.aclose()
        await other.aclose()


async def test_broadcaster_cuts_off_a_lagging_subscriber() -> None:
    feed = Broadcaster(buffer=2)
    with feed.subscribe() as slow, feed.subscribe() as fast:
        feed.publish({"n": 1})
        assert fast.receive_nowait() == {"n": 1}
        feed.publish({"n": 2})
        assert fast.receive_nowait() == {"n": 2}
        feed.publish({"n": 3})  # slow has 2 waiting: cut off
        assert feed.dropped == 1
        assert feed.subscribers == 1
        assert [event async for event in slow] == [{"n": 1}, {"n": 2}]
        assert fast.receive_nowait() == {"n": 3}
    assert feed.subscribers == 0


# The synchronous client and the CLI verbs, against the real server.


async def test_client_library(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"

    def use_client() -> None:
        with ControlClient(path, timeout=5) as client:
            assert client.request("status")["source"] == "udev"
            result = client.request(
                "attach", target="lxc:ha", device="/dev/x", mode=None, path="/p"
            )
            assert result == {"container": "lxc:ha", "device": "/dev/x", "path": "/p"}
            with pytest.raises(ControlError, match="lxc:ha has no grant for /dev/x") as failed:
                client.request("detach", target="lxc:ha", device="/dev/x")
            assert failed.value.code == "failed"
            with pytest.raises(ControlError, match='unknown verb "nope"'):
                client.request("nope")
            stream = client.stream("monitor")
            assert next(stream) == {"n": 1}
            assert next(stream) == {"n": 2}

    async def publish_when_subscribed() -> None:
        await eventually(lambda: handler.feed.subscribers == 1)
        handler.feed.publish({"n": 1})
        handler.feed.publish({"n": 2})

    async with running(handler, ControlSettings(path)), trio.open_nursery() as nursery:
        nursery.start_soon(publish_when_subscribed)
        await trio.to_thread.run_sync(use_client)


def test_client_says_when_the_daemon_is_not_running(socket_dir: Path) -> None:
    missing = socket_dir / "missing.sock"
    with pytest.raises(DaemonNotRunningError, match="not running \\(no socket at") as caught:
        ControlClient(missing).request("status")
    assert caught.value.exit_code == 3
    stale = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    with pytest.raises(DaemonNotRunningError, match="nothing listens at"):
        ControlClient(stale).request("status")


async def test_client_maps_a_refusal_to_permission_denied(socket_dir: Path) -> None:
    # A fake daemon that refuses every peer, as the real one refuses strangers.
    path = socket_dir / "refusing.sock"
    refusal = b'{"id": null, "ok": false, "error": "permission denied: x", "code": "denied"}\n'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def refuse() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(refusal)

        def ask() -> None:
            with ControlClient(path) as client:
                client.request("status")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, refuse)
            with pytest.raises(ControlPermissionError, match="permission denied: x") as caught:
                await trio.to_thread.run_sync(ask)
            assert caught.value.exit_code == 2


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hotrelay")
    add_control_verbs(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(argv)


async def test_cli_verbs(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"

    def run(argv: list[str]) -> str:
        args = parse_cli([*argv, "--socket", str(path)])
        assert callable(args.func)
        out = io.StringIO()
        assert run_control_verb(args.verb, args, out) == 0
        return out.getvalue()

    async with running(handler, ControlSettings(path)):
        listing = await trio.to_thread.run_sync(run, ["list"])
        since = render("list", [GRANT]).splitlines()[1].split("  ")[-1]
        assert listing.splitlines() == [
            "CONTAINER  DEVICE        PATH         SINCE",
            f"lxc:ha     /dev/ttyUSB0  /dev/zigbee  {since}",
        ]
        assert json.loads(await trio.to_thread.run_sync(run, ["list", "--json"])) == [GRANT]
        status = await trio.to_thread.run_sync(run, ["status"])
        assert status.splitlines() == ["uptime  1h 2m", "source  udev", "counters:", "  events  3"]
        attach = ["attach", "lxc:ha", "/dev/ttyUSB0", "--mode", "0660", "--owner", "0"]
        assert json.loads(await trio.to_thread.run_sync(run, [*attach, "--json"])) == {
            "container": "lxc:ha",
            "device": "/dev/ttyUSB0",
            "mode": "0660",
            "owner": 0,
        }
        assert await trio.to_thread.run_sync(run, ["refresh", "lxc", "web"]) == "scheduled  yes\n"
        with pytest.raises(ControlError, match="lxc:ha has no grant"):
            await trio.to_thread.run_sync(run, ["detach", "lxc:ha", "/dev/ttyUSB0"])
    assert ("attach", "lxc:ha", "/dev/ttyUSB0", {"mode": "0660", "owner": 0}) in handler.calls


async def test_cli_monitor_from_the_daemon(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count", type=int)
    add_daemon_monitor_options(parser)
    out = io.StringIO()

    async def publish_when_subscribed() -> None:
        await eventually(lambda: handler.feed.subscribers == 1)
        handler.feed.publish({"type": "uevent", "action": "add", "devpath": "/devices/x"})
        handler.feed.publish({"type": "action", "kind": "grant", "outcome": "ok"})

    for argv, expected in (
        (
            ["--count", "2"],
            ["UEVENT   action=add devpath=/devices/x", "ACTION   kind=grant outcome=ok"],
        ),
        (
            ["--count", "1", "--json"],
            ['{"type": "uevent", "action": "add", "devpath": "/devices/x"}'],
        ),
    ):
        args = parser.parse_args([*argv, "--daemon", "--socket", str(path)])
        assert args.daemon
        out = io.StringIO()
        async with running(handler, ControlSettings(path)), trio.open_nursery() as nursery:
            nursery.start_soon(publish_when_subscribed)
            assert await trio.to_thread.run_sync(run_daemon_monitor, args, out) == 0
        assert out.getvalue().splitlines() == expected


async def test_cli_monitor_says_so_when_the_daemon_stops(
    socket_dir: Path, handler: RecordingHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    """``monitor --daemon`` used to end with status 0 and no word when the daemon went."""
    path = socket_dir / "control.sock"
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count", type=int)
    add_daemon_monitor_options(parser)
    args = parser.parse_args(["--daemon", "--socket", str(path)])
    out = io.StringIO()
    results: list[int] = []

    async def client() -> None:
        results.append(await trio.to_thread.run_sync(run_daemon_monitor, args, out))

    async with trio.open_nursery() as nursery, running(handler, ControlSettings(path)):
        nursery.start_soon(client)
        await eventually(lambda: handler.feed.subscribers == 1)
        handler.feed.publish({"type": "uevent", "action": "add", "devpath": "/devices/x"})
        await eventually(lambda: out.getvalue() != "")
    assert results == [1]
    assert "the daemon closed the stream after 1 event(s)" in capsys.readouterr().err


def test_cli_finds_the_socket_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "hotrelay.toml"
    assert default_socket(config) == Path("/run/hotrelay/control.sock")  # no file
    config.write_text('socket = "/run/elsewhere.sock"\n')
    assert default_socket(config) == Path("/run/elsewhere.sock")
    config.write_text("socket = 1\n")  # the daemon reports that; the CLI falls back
    assert default_socket(config) == Path("/run/hotrelay/control.sock")


def test_settings_from_config() -> None:
    assert ControlSettings.from_config(Config()) == ControlSettings()
    assert ControlSettings.from_config(Config(socket="/s.sock", socket_group=7)) == ControlSettings(
        Path("/s.sock"), group=7
    )
    assert ControlSettings.from_config(Config(socket_group="root")).group == 0
    with pytest.raises(ControlSocketError, match="socket_group 'no-such-group-x': no such group"):
        ControlSettings.from_config(Config(socket_group="no-such-group-x"))


def test_render_for_people() -> None:
    assert render("list", []) == "no grants"
    assert render("reload", {}) == "ok"
    assert render("reload", None) == "ok"
    assert render(
        "status",
        {
            "containers": [{"name": "ha", "runtime": "lxc", "pid": 42}],
            "rule_files": ["/etc/hotrelay/rules.d/a.toml"],
            "last_error": None,
        },
    ).splitlines() == [
        "containers (1):",
        "  RUNTIME  NAME  PID",
        "  lxc      ha    42",
        "rule files (1):",
        "  /etc/hotrelay/rules.d/a.toml",
        "last error  -",
    ]


# The LXC hook, run as LXC runs it.

HOOK = ROOT / "units" / "lxc-hotrelay-hook"


async def test_lxc_hook_tells_the_daemon(socket_dir: Path, handler: RecordingHandler) -> None:
    path = socket_dir / "control.sock"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOTRELAY_SOCKET": str(path),
        "LXC_NAME": "web",
        "LXC_HOOK_TYPE": "start-host",
    }
    async with running(handler, ControlSettings(path)):
        done = await trio.run_process(
            [sys.executable, str(HOOK), "web", "lxc", "start-host"], env=env, capture_stderr=True
        )
        assert done.returncode == 0
        assert done.stderr == b""
        # Hook version 1: no arguments, the environment only.
        done = await trio.run_process(
            [sys.executable, str(HOOK)], env={**env, "LXC_HOOK_TYPE": "post-stop"}
        )
    assert handler.calls == [("refresh", "lxc", "web"), ("refresh", "lxc", "web")]


async def test_lxc_hook_never_fails_a_container_start(socket_dir: Path) -> None:
    env = {"HOTRELAY_SOCKET": str(socket_dir / "nobody.sock"), "LXC_NAME": "web"}
    done = await trio.run_process(
        [sys.executable, str(HOOK), "web", "lxc", "start-host"], env=env, capture_stderr=True
    )
    assert done.returncode == 0
    assert done.stderr == b""  # a stopped daemon is normal, not worth a word
