"""LXD: a private daemon, an unprivileged busybox instance, the REST API and its events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from hotrelay.core.containers import (
    ContainerEvent,
    ContainerStarted,
    ContainerStopped,
    IdMap,
    IdRange,
    Runtime,
)
from hotrelay.runtimes.lxd import LxdAdapter
from hotrelay.testing.containers import LxdEngine, SessionDirs, next_event_for

pytestmark = pytest.mark.privileged


def configured_idmap(lxd: LxdEngine, name: str) -> IdMap:
    """What LXD says it gave the instance: volatile.idmap.current, as uid ranges."""
    raw = lxd.cli("config", "get", name, "volatile.idmap.current").stdout
    return IdMap(
        tuple(
            IdRange(entry["Nsid"], entry["Hostid"], entry["Maprange"])
            for entry in json.loads(raw)
            if entry["Isuid"]
        )
    )


async def test_unprivileged_instance_resolved_through_rest(
    lxd_engine: LxdEngine, runtime_dirs: SessionDirs
) -> None:
    name = runtime_dirs.name("xu")
    lxd_engine.launch(name)
    try:
        adapter = LxdAdapter([lxd_engine.socket])
        [ref] = await adapter.resolve(name)
        assert ref.runtime is Runtime.LXD
        assert ref.name == name
        assert ref.pid == lxd_engine.pid(name)
        assert not ref.privileged
        assert ref.uid_map == configured_idmap(lxd_engine, name)
        assert ref.uid_map.to_host(0) == 100000
        assert ref.gid_map.to_host(20) == 100020
        assert ref.devices_cgroup == f"/lxc.payload.{name}"
        assert ref.host_network is False
        assert name in {r.name for r in await adapter.list_running()}
        assert await adapter.resolve("no-such-instance") == []
    finally:
        lxd_engine.cli("delete", "--force", name)


async def test_absent_daemon_is_skipped(tmp_path: Path) -> None:
    adapter = LxdAdapter([tmp_path / "unix.socket"])
    assert await adapter.list_running() == []
    assert adapter.unavailable_reason is not None


async def test_lifecycle_through_the_events_websocket(
    lxd_engine: LxdEngine, runtime_dirs: SessionDirs
) -> None:
    name = runtime_dirs.name("xw")
    lxd_engine.launch(name)
    # Polling off: only the events WebSocket (and pidfds) can report changes.
    adapter = LxdAdapter([lxd_engine.socket], poll_interval=3600, resync_interval=3600)
    send, receive = trio.open_memory_channel[ContainerEvent](1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            first = await next_event_for(receive, name)
            assert isinstance(first, ContainerStarted)

            await trio.to_thread.run_sync(lxd_engine.cli, "stop", "--force", name)
            stopped = await next_event_for(receive, name)
            assert isinstance(stopped, ContainerStopped)
            assert stopped.container.pid == first.container.pid

            await trio.to_thread.run_sync(lxd_engine.cli, "start", name)
            started = await next_event_for(receive, name)
            assert isinstance(started, ContainerStarted)
            assert started.container.pid == lxd_engine.pid(name) != first.container.pid
            assert not started.container.privileged

            await trio.to_thread.run_sync(lxd_engine.cli, "restart", "--force", name)
            gone = await next_event_for(receive, name)
            back = await next_event_for(receive, name)
            assert isinstance(gone, ContainerStopped)
            assert gone.container.pid == started.container.pid
            assert isinstance(back, ContainerStarted)
            assert back.container.pid == lxd_engine.pid(name) != started.container.pid
            nursery.cancel_scope.cancel()
    finally:
        lxd_engine.cli("delete", "--force", name, check=False)
