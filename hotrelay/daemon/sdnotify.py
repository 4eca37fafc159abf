"""sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET.

systemd's protocol is one datagram of newline-separated ``KEY=VALUE`` lines to the
unix socket named in NOTIFY_SOCKET; a name starting with ``@`` is in the abstract
namespace. Without NOTIFY_SOCKET (not started by systemd, or not Type=notify) every
call is a no-op, so the daemon calls these unconditionally.

    notifier = Notifier.from_environment()
    notifier.ready("listening on udev")          # after coldplug, when the socket serves
    notifier.reloading(); ...; notifier.ready()  # around SIGHUP
    notifier.stopping()
    interval = watchdog_interval()               # send WATCHDOG=1 at least this often
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

__all__ = ["Notifier", "feed_watchdog", "watchdog_interval"]

log = logging.getLogger("hotrelay.sdnotify")


class Notifier:
    """Sends state changes to systemd; never raises, a lost notification is only logged."""

    def __init__(self, address: str | None) -> None:
        self.address = _socket_address(address) if address else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if systemd got it."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                # Non-blocking: a notification must never stall the event loop.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", assignments[0] if assignments else "", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) match this reload to
        # the SIGHUP it sent; older versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One line: a newline would start another assignment.
    return ("STATUS=" + " ".join(text.splitlines()),)


def _socket_address(name: str) -> str:
    if name.startswith("@"):
        return "\0" + name[1:]
    return name


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """Seconds between the WATCHDOG=1 pings systemd expects, or None if it expects none.

    systemd sets WATCHDOG_USEC (WatchdogSec=) and WATCHDOG_PID (the process it watches);
    a WATCHDOG_PID of another process means the variables were inherited, not meant for us.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    expected_pid = env.get("WATCHDOG_PID")
    if expected_pid is not None and expected_pid != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000


async def feed_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping at half the interval (what sd_watchdog_enabled(3) recommends) until cancelled.

    A timer in the trio loop proves the loop still runs: a task that blocks the loop
    stops these pings and systemd restarts the daemon.
    """
    task_status.started()
    while True:
        notifier.watchdog()
        await trio.sleep(interval / 2)
