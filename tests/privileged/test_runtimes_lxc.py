"""LXC: real busybox containers, privileged and unprivileged, found by name and followed.

Expected values come from LXC's own tools (``lxc-info``) and from the kernel
(/proc/PID/cgroup, /proc/PID/uid_map, /proc/PID/ns), never from the adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hotrelay.core.containers import (
    ContainerEvent,
    ContainerStarted,
    ContainerStopped,
    IdMap,
    Runtime,
)
from hotrelay.runtimes.lxc import LxcAdapter
from hotrelay.testing.containers import LxcContainer, LxcHost, SessionDirs, next_event_for

pytestmark = pytest.mark.privileged


def kernel_cgroups(pid: int) -> tuple[str, str]:
    """(devices, unified) paths straight from /proc/PID/cgroup."""
    devices = unified = ""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            unified = path
        elif "devices" in controllers.split(","):
            devices = path
    return devices, unified


@pytest.fixture(scope="module")
def two_containers(
    lxc_host: LxcHost, runtime_dirs: SessionDirs
) -> Iterator[tuple[LxcContainer, LxcContainer]]:
    privileged = lxc_host.create(runtime_dirs.name("lp"))
    unprivileged = lxc_host.create(runtime_dirs.name("lu"), unprivileged=True)
    privileged.start()
    unprivileged.start()
    yield privileged, unprivileged
    privileged.destroy()
    unprivileged.destroy()


@pytest.mark.parametrize("which", ["privileged", "unprivileged"])
async def test_resolved_by_name_with_pid_cgroups_and_idmap(
    lxc_host: LxcHost, two_containers: tuple[LxcContainer, LxcContainer], which: str
) -> None:
    container = two_containers[0 if which == "privileged" else 1]
    adapter = LxcAdapter([lxc_host.lxcpath])

    [ref] = await adapter.resolve(container.name)

    assert ref.runtime is Runtime.LXC
    assert ref.name == container.name
    assert ref.pid == container.pid()  # lxc-info's answer
    devices, unified = kernel_cgroups(ref.pid)
    assert (ref.devices_cgroup, ref.unified_cgroup) == (devices, unified)
    assert devices == f"/lxc.payload.{container.name}"
    for kind in ("mnt", "net", "user", "pid"):
        assert ref.namespaces[kind] == os.stat(f"/proc/{ref.pid}/ns/{kind}").st_ino
    assert ref.host_network is False  # lxc.net.0.type = empty: its own netns
    assert ref.start_time is not None
    if which == "privileged":
        assert ref.privileged
        assert ref.uid_map.is_identity
        assert ref.namespaces["user"] == os.stat("/proc/self/ns/user").st_ino
    else:
        assert not ref.privileged
        assert ref.uid_map == IdMap.parse("0 100000 65536\n") == ref.gid_map
        assert ref.uid_map.to_host(20) == 100020
        assert ref.namespaces["user"] != os.stat("/proc/self/ns/user").st_ino


async def test_list_and_glob(
    lxc_host: LxcHost, two_containers: tuple[LxcContainer, LxcContainer]
) -> None:
    adapter = LxcAdapter([lxc_host.lxcpath])
    privileged, unprivileged = two_containers
    listed = {ref.name: ref.pid for ref in await adapter.list_running()}
    assert listed[privileged.name] == privileged.pid()
    assert listed[unprivileged.name] == unprivileged.pid()
    prefix = privileged.name[:2]
    assert [r.name for r in await adapter.resolve(f"{prefix}*")] == [privileged.name]
    assert await adapter.resolve("no-such-container") == []


async def test_missing_lxcpath_and_stopped_container_resolve_to_nothing(
    lxc_host: LxcHost, runtime_dirs: SessionDirs, tmp_path: Path
) -> None:
    assert await LxcAdapter([tmp_path / "nowhere"]).list_running() == []
    stopped = lxc_host.create(runtime_dirs.name("ls"))
    try:
        assert await LxcAdapter([lxc_host.lxcpath]).resolve(stopped.name) == []
    finally:
        stopped.destroy()


@pytest.mark.parametrize("unprivileged", [False, True], ids=["privileged", "unprivileged"])
async def test_stop_start_and_restart_are_observed(
    lxc_host: LxcHost, runtime_dirs: SessionDirs, unprivileged: bool
) -> None:
    container = lxc_host.create(runtime_dirs.name("lw"), unprivileged=unprivileged)
    container.start()
    adapter = LxcAdapter([lxc_host.lxcpath], poll_interval=0.2, resync_interval=3600)
    send, receive = trio.open_memory_channel[ContainerEvent](1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            started = await next_event_for(receive, container.name)
            assert isinstance(started, ContainerStarted)
            assert started.container.pid == container.pid()

            await trio.to_thread.run_sync(container.stop)
            stopped = await next_event_for(receive, container.name)
            assert stopped == ContainerStopped(started.container, "exited")

            await trio.to_thread.run_sync(container.start)
            again = await next_event_for(receive, container.name)
            assert isinstance(again, ContainerStarted)
            assert again.container.pid == container.pid() != started.container.pid

            await trio.to_thread.run_sync(container.restart)
            gone = await next_event_for(receive, container.name)
            back = await next_event_for(receive, container.name)
            assert isinstance(gone, ContainerStopped)
            assert gone.container.pid == again.container.pid
            assert isinstance(back, ContainerStarted)
            assert back.container.pid == container.pid()
            assert back.container.pid not in (started.container.pid, again.container.pid)
            expected_map = IdMap.parse("0 100000 65536\n") if unprivileged else IdMap.identity()
            assert back.container.uid_map == expected_map
            nursery.cancel_scope.cancel()
    finally:
        container.destroy()
