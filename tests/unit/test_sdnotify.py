"""sd_notify over a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from hotrelay.daemon.sdnotify import Notifier, feed_watchdog, watchdog_interval


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its path."""
    path = tmp_path / "notify"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for a unix socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield sock, str(path)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_reloading_stopping_watchdog_status(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("listening on udev")
    assert received(sock) == ["READY=1", "STATUS=listening on udev"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    reloading, monotonic = received(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading == "RELOADING=1"
    assert monotonic.startswith("MONOTONIC_USEC=")
    assert before <= int(monotonic.removeprefix("MONOTONIC_USEC=")) <= after
    assert notifier.ready()
    assert received(sock) == ["READY=1"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.status("3 containers,\n12 grants")
    assert received(sock) == ["STATUS=3 containers, 12 grants"]  # one line, one assignment
    assert notifier.stopping("revoking")
    assert received(sock) == ["STOPPING=1", "STATUS=revoking"]
    notifier.close()


def test_abstract_socket_name() -> None:
    name = f"hotrelay-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier(f"@{name}")
        assert notifier.ready()
        assert received(sock) == ["READY=1"]
        notifier.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled


def test_a_missing_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.ready()
    assert "sd_notify READY=1 failed" in caplog.text
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # inherited, not ours
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    env = {key: value.format(pid=os.getpid()) for key, value in environ.items()}
    assert watchdog_interval(env) == interval


async def test_feed_watchdog_pings_at_half_the_interval(
    systemd: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = systemd
    sock.setblocking(False)
    notifier = Notifier(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed_watchdog, notifier, 10.0)
        await trio.sleep(12)  # pings at 0, 5, 10
        nursery.cancel_scope.cancel()
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 3
    notifier.close()
