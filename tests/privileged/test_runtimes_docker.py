"""Docker: a private dockerd, found through the Engine API and followed by its events."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from hotrelay.core.containers import ContainerEvent, ContainerStarted, ContainerStopped, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.docker import DockerAdapter
from hotrelay.runtimes.oci import OciAdapter
from hotrelay.testing.containers import DockerEngine, SessionDirs, next_event_for

pytestmark = pytest.mark.privileged


def kernel_devices_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return path
    raise AssertionError("no devices cgroup")


async def test_resolved_by_name_through_the_engine_api(
    docker_engine: DockerEngine, runtime_dirs: SessionDirs
) -> None:
    name = runtime_dirs.name("dk")
    container_id = docker_engine.run_container(name)
    try:
        adapter = DockerAdapter(docker_engine.socket, exec_root=docker_engine.exec_root)
        [ref] = await adapter.resolve(name)
        assert ref.runtime is Runtime.DOCKER
        assert (ref.name, ref.id) == (name, container_id)
        assert ref.pid == docker_engine.pid(name)
        assert ref.devices_cgroup == kernel_devices_cgroup(ref.pid) == f"/docker/{container_id}"
        assert ref.host_network is False  # --network none: a netns of its own
        assert ref.privileged
        assert ref.uid_map.is_identity
        # runc's own rules (from its state.json): deny all, then the OCI defaults.
        assert ref.base_device_rules[0] == DeviceRule.parse("a", allow=False)
        assert DeviceRule.parse("c 1:3 rwm") in ref.base_device_rules
        assert DeviceRule.parse("c 136:* rwm") in ref.base_device_rules
        # The same container through runc's state directory, by id.
        runc = OciAdapter([docker_engine.exec_root / "runtime-runc" / "moby"])
        [by_id] = await runc.resolve(container_id)
        assert (by_id.pid, by_id.start_time) == (ref.pid, ref.start_time)
        assert by_id.base_device_rules == ref.base_device_rules
        # Name globs, and names the daemon does not know.
        assert [r.name for r in await adapter.resolve(name[:3] + "*")] == [name]
        assert await adapter.resolve("no-such-container") == []
    finally:
        docker_engine.cli("rm", "-f", name)


async def test_absent_daemon_is_skipped(tmp_path: Path) -> None:
    adapter = DockerAdapter(tmp_path / "docker.sock")
    assert await adapter.list_running() == []
    assert await adapter.resolve("anything") == []
    assert adapter.unavailable_reason is not None


async def test_start_and_die_through_the_event_stream(
    docker_engine: DockerEngine, runtime_dirs: SessionDirs
) -> None:
    name = runtime_dirs.name("dw")
    docker_engine.run_container(name)
    # No polling at all: only the event stream (and pidfds) can report changes.
    adapter = DockerAdapter(
        docker_engine.socket,
        exec_root=docker_engine.exec_root,
        poll_interval=3600,
        resync_interval=3600,
    )
    send, receive = trio.open_memory_channel[ContainerEvent](1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            first = await next_event_for(receive, name)
            assert isinstance(first, ContainerStarted)
            assert first.container.pid == docker_engine.pid(name)

            await trio.to_thread.run_sync(docker_engine.cli, "stop", "-t", "0", name)
            stopped = await next_event_for(receive, name)
            assert isinstance(stopped, ContainerStopped)
            assert stopped.container == first.container

            await trio.to_thread.run_sync(docker_engine.cli, "start", name)
            started = await next_event_for(receive, name)
            assert isinstance(started, ContainerStarted)
            assert started.container.pid == docker_engine.pid(name) != first.container.pid

            await trio.to_thread.run_sync(docker_engine.cli, "restart", "-t", "0", name)
            gone = await next_event_for(receive, name)
            back = await next_event_for(receive, name)
            assert isinstance(gone, ContainerStopped)
            assert gone.container.pid == started.container.pid
            assert isinstance(back, ContainerStarted)
            assert back.container.pid == docker_engine.pid(name) != started.container.pid

            await trio.to_thread.run_sync(docker_engine.cli, "rm", "-f", name)
            removed = await next_event_for(receive, name)
            assert isinstance(removed, ContainerStopped)
            assert removed.container.pid == back.container.pid
            nursery.cancel_scope.cancel()
    finally:
        docker_engine.cli("rm", "-f", name, check=False)
