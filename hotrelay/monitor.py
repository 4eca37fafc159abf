"""``hotrelay monitor``: a live, udevadm-monitor-like view of the trusted event source."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import trio

from hotrelay.core.uevent import Uevent
from hotrelay.daemon.source import EventSource, Overflow, SourceItem, SourceKind

__all__ = ["MonitorOptions", "format_event", "run_monitor", "uevent_to_json"]


@dataclass(frozen=True)
class MonitorOptions:
    kind: SourceKind = SourceKind.AUTO
    json: bool = False
    properties: bool = False
    subsystems: frozenset[str] = frozenset()
    count: int | None = None
    timeout: float | None = None
    rcvbuf: int = 64 * 1024 * 1024


def uevent_to_json(uevent: Uevent) -> dict[str, Any]:
    return {
        "wire": uevent.wire.value,
        "action": uevent.action,
        "devpath": uevent.devpath,
        "subsystem": uevent.subsystem,
        "devtype": uevent.devtype,
        "devname": uevent.devname,
        "major": uevent.major,
        "minor": uevent.minor,
        "seqnum": uevent.seqnum,
        "properties": dict(uevent.properties),
    }


def format_event(uevent: Uevent, *, properties: bool, now: float) -> str:
    label = "KERNEL" if uevent.wire.value == "kernel" else "UDEV  "
    line = f"{label}[{now:.6f}] {uevent.action:<8} {uevent.devpath} ({uevent.subsystem})"
    if properties:
        line += "".join(f"\n{key}={value}" for key, value in uevent.properties.items()) + "\n"
    return line


def _emit(item: SourceItem, options: MonitorOptions, out: TextIO) -> bool:
    """Print one item; True if it counts towards --count."""
    if isinstance(item, Overflow):
        if options.json:
            out.write(json.dumps({"overflow": True, "source": item.kind.value}) + "\n")
        else:
            out.write("OVERFLOW: the kernel dropped events; a full resync is needed\n")
        return False
    if options.subsystems and item.subsystem not in options.subsystems:
        return False
    if options.json:
        out.write(json.dumps(uevent_to_json(item)) + "\n")
    else:
        out.write(format_event(item, properties=options.properties, now=time.monotonic()) + "\n")
    return True


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def run_monitor(options: MonitorOptions, out: TextIO, err: TextIO) -> int:
    with EventSource(options.kind, rcvbuf=options.rcvbuf) as source:
        err.write(
            f"monitor: listening to {source.kind.value} uevents "
            f"(receive buffer {source.rcvbuf} bytes); Ctrl-C stops\n"
        )
        err.flush()
        send, receive = trio.open_memory_channel[Sequence[SourceItem]](64)
        printed = 0
        timeout = math.inf if options.timeout is None else options.timeout
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
                await nursery.start(source.run, send)
                async for batch in receive:
                    for item in batch:
                        printed += _emit(item, options, out)
                        if options.count is not None and printed >= options.count:
                            nursery.cancel_scope.cancel()
                            break
                    out.flush()
                    if nursery.cancel_scope.cancel_called:
                        break
        stats = source.stats
        err.write(
            f"monitor: {stats.received} received, {stats.accepted} accepted, "
            f"{stats.dropped_untrusted} untrusted, {stats.dropped_malformed} malformed, "
            f"{stats.dropped_truncated} oversized, {stats.overflows} overflows\n"
        )
    return 0
