"""The shared runtime watcher, driven by a scripted adapter over real processes.

No root needed: the "containers" are ``sleep`` processes this test starts, so pidfds,
/proc reads and exits are all real; only the runtime's answers are scripted.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator

import pytest
import trio

from hotrelay.core.containers import (
    ContainerEvent,
    ContainerRef,
    ContainerStarted,
    ContainerStopped,
    Runtime,
)
from hotrelay.runtimes.base import Adapter, HintSend
from hotrelay.runtimes.errors import ContainerGone, RuntimeUnavailable
from hotrelay.runtimes.procfs import PidHandle, snapshot


class ScriptedAdapter(Adapter):
    """A runtime whose container list is whatever the test says."""

    runtime = Runtime.NSPAWN

    def __init__(self) -> None:
        super().__init__(poll_interval=0.05, resync_interval=3600)
        self.pids: dict[str, int] = {}
        self.unavailable = False
        self.hint_send: HintSend | None = None
        self.listings = 0

    def describe(self) -> str:
        return "scripted"

    async def _list_running(self) -> list[ContainerRef]:
        await trio.lowlevel.checkpoint()
        self.listings += 1
        if self.unavailable:
            raise RuntimeUnavailable("the scripted runtime is switched off")
        refs = []
        for name, pid in sorted(self.pids.items()):
            try:
                refs.append(snapshot(self.runtime, name, pid))
            except ContainerGone:
                continue
        return refs

    async def hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        self.hint_send = send
        task_status.started()
        await trio.sleep_forever()

    async def poll_fingerprint(self) -> object:
        await trio.lowlevel.checkpoint()
        return (self.unavailable, tuple(sorted(self.pids.items())))


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def start_sleep(processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["sleep", "1000"])
    processes.append(process)
    return process


async def next_event(receive: trio.MemoryReceiveChannel[ContainerEvent]) -> ContainerEvent:
    with trio.fail_after(5):
        return await receive.receive()


def no_event_pending(receive: trio.MemoryReceiveChannel[ContainerEvent]) -> bool:
    try:
        receive.receive_nowait()
    except trio.WouldBlock:
        return True
    return False


async def test_running_containers_are_reported_before_started(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    adapter = ScriptedAdapter()
    adapter.pids = {"a": start_sleep(spawn).pid, "b": start_sleep(spawn).pid}
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        # Everything already running was reported by the time start() returned.
        events = [receive.receive_nowait(), receive.receive_nowait()]
        assert [type(e) for e in events] == [ContainerStarted, ContainerStarted]
        assert [e.container.name for e in events] == ["a", "b"]
        assert events[0].container.pid == adapter.pids["a"]
        nursery.cancel_scope.cancel()


async def test_exit_is_reported_from_the_pidfd(spawn: list[subprocess.Popen[bytes]]) -> None:
    adapter = ScriptedAdapter()
    process = start_sleep(spawn)
    adapter.pids = {"a": process.pid}
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        started = await next_event(receive)
        process.kill()
        stopped = await next_event(receive)
        assert stopped == ContainerStopped(started.container, "exited")
        # The runtime still lists the dead pid: it must not come back as "started".
        await trio.sleep(0.3)
        assert no_event_pending(receive)
        nursery.cancel_scope.cancel()


async def test_restart_is_a_stop_then_a_start_with_the_new_pid(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    adapter = ScriptedAdapter()
    adapter.pids = {"a": start_sleep(spawn).pid}
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        first = await next_event(receive)
        # The runtime replaced the init without the old one exiting first.
        adapter.pids["a"] = start_sleep(spawn).pid
        assert adapter.hint_send is not None
        adapter.hint_send.send_nowait("a")
        stopped, started = await next_event(receive), await next_event(receive)
        assert stopped == ContainerStopped(first.container, "runtime")
        assert isinstance(started, ContainerStarted)
        assert started.container.pid == adapter.pids["a"] != first.container.pid
        nursery.cancel_scope.cancel()


async def test_a_start_is_noticed_through_the_fingerprint(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    adapter = ScriptedAdapter()
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        adapter.pids["late"] = start_sleep(spawn).pid
        event = await next_event(receive)
        assert isinstance(event, ContainerStarted)
        assert event.container.name == "late"
        nursery.cancel_scope.cancel()


async def test_resync_reports_what_vanished(spawn: list[subprocess.Popen[bytes]]) -> None:
    adapter = ScriptedAdapter()
    adapter.poll_interval = 3600  # only the explicit resync below
    adapter.pids = {"a": start_sleep(spawn).pid, "b": start_sleep(spawn).pid}
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        await next_event(receive)
        await next_event(receive)
        del adapter.pids["b"]  # the runtime forgot it; its process lives on
        now = await adapter.resync()
        assert [ref.name for ref in now] == ["a"]
        event = receive.receive_nowait()
        assert isinstance(event, ContainerStopped)
        assert (event.container.name, event.reason) == ("b", "vanished")
        nursery.cancel_scope.cancel()


async def test_absent_runtime_is_one_log_line_then_picked_up(
    spawn: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hotrelay.runtimes")
    adapter = ScriptedAdapter()
    adapter.unavailable = True
    adapter.pids = {"a": start_sleep(spawn).pid}
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        assert await adapter.list_running() == []
        assert await adapter.resolve("a") == []
        for _ in range(3):
            adapter.hint_send.send_nowait(None)  # type: ignore[union-attr]
            await trio.sleep(0.05)
        skipped = [r for r in caplog.records if "not available" in r.getMessage()]
        assert len(skipped) == 1
        assert "switched off" in skipped[0].getMessage()
        adapter.unavailable = False
        event = await next_event(receive)
        assert isinstance(event, ContainerStarted)
        assert any("available again" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_a_container_gone_mid_lookup_is_not_running(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    adapter = ScriptedAdapter()
    process = start_sleep(spawn)
    process.kill()
    process.wait()
    adapter.pids = {"dead": process.pid}
    assert await adapter.resolve("dead") == []
    assert await adapter.resolve("d*") == []
    assert await adapter.lookup("dead") is None


async def test_resolve_exact_names_and_globs(spawn: list[subprocess.Popen[bytes]]) -> None:
    adapter = ScriptedAdapter()
    adapter.pids = {"web1": start_sleep(spawn).pid, "web2": start_sleep(spawn).pid}
    adapter.pids["db"] = start_sleep(spawn).pid
    assert [r.name for r in await adapter.resolve("web*")] == ["web1", "web2"]
    assert [r.pid for r in await adapter.resolve("db")] == [adapter.pids["db"]]
    assert await adapter.resolve("nope") == []


def test_pid_handle_refuses_a_reused_pid(spawn: list[subprocess.Popen[bytes]]) -> None:
    process = start_sleep(spawn)
    with PidHandle.open(process.pid) as handle:
        start_time = handle.start_time
        assert handle.alive()
    with pytest.raises(ContainerGone, match="now belongs to another process"):
        PidHandle.open(process.pid, expected_start_time=start_time + 1)
    with pytest.raises(ContainerGone, match="is gone"):
        PidHandle.open(2**22 + 1)  # above the default pid_max
