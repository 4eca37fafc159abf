"""Podman: through its tool (daemonless) and through its API socket."""

from __future__ import annotations

import pytest
import trio

from hotrelay.core.containers import ContainerEvent, ContainerStarted, ContainerStopped, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.podman import PodmanAdapter
from hotrelay.testing.containers import PodmanEngine, SessionDirs, next_event_for

pytestmark = pytest.mark.privileged


@pytest.mark.parametrize("mode", ["tool", "api"])
async def test_resolved_by_name(
    podman_engine: PodmanEngine, runtime_dirs: SessionDirs, mode: str
) -> None:
    name = runtime_dirs.name("pm")
    container_id = podman_engine.run_container(name)
    socket = podman_engine.start_service() if mode == "api" else None
    try:
        adapter = PodmanAdapter(socket, podman_argv=podman_engine.argv)
        [ref] = await adapter.resolve(name)
        assert ref.runtime is Runtime.PODMAN
        assert (ref.name, ref.id) == (name, container_id)
        assert ref.pid == podman_engine.pid(name)
        assert ref.devices_cgroup is not None
        assert container_id in ref.devices_cgroup
        assert ref.host_network is False  # --network none
        # Podman runs runc with its default root: the rules runc applied.
        assert ref.base_device_rules[0] == DeviceRule.parse("a", allow=False)
        assert DeviceRule.parse("c 1:3 rwm") in ref.base_device_rules
        assert name in {r.name for r in await adapter.list_running()}
        assert await adapter.resolve("no-such-container") == []
    finally:
        podman_engine.cli("rm", "--force", "--time", "0", name)


@pytest.mark.parametrize("mode", ["tool", "api"])
async def test_stop_start_restart_observed(
    podman_engine: PodmanEngine, runtime_dirs: SessionDirs, mode: str
) -> None:
    name = runtime_dirs.name("pw")
    podman_engine.run_container(name)
    socket = podman_engine.start_service() if mode == "api" else None
    # Polling off: only podman's events (and pidfds) can report changes.
    adapter = PodmanAdapter(
        socket, podman_argv=podman_engine.argv, poll_interval=3600, resync_interval=3600
    )
    send, receive = trio.open_memory_channel[ContainerEvent](1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            first = await next_event_for(receive, name)
            assert isinstance(first, ContainerStarted)

            await trio.to_thread.run_sync(podman_engine.stop, name)
            stopped = await next_event_for(receive, name)
            assert isinstance(stopped, ContainerStopped)
            assert stopped.container.pid == first.container.pid

            await trio.to_thread.run_sync(podman_engine.start, name)
            started = await next_event_for(receive, name)
            assert isinstance(started, ContainerStarted)
            assert started.container.pid == podman_engine.pid(name) != first.container.pid

            await trio.to_thread.run_sync(podman_engine.restart, name)
            gone = await next_event_for(receive, name)
            back = await next_event_for(receive, name)
            assert isinstance(gone, ContainerStopped)
            assert isinstance(back, ContainerStarted)
            assert back.container.pid == podman_engine.pid(name) != started.container.pid
            nursery.cancel_scope.cancel()
    finally:
        podman_engine.cli("rm", "--force", "--time", "0", name, check=False)
