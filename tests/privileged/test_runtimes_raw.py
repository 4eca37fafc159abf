"""``pid:`` and ``cgroup:`` targets on sandbox containers (raw namespaces and cgroups)."""

from __future__ import annotations

import pytest
import trio

from hotrelay.core.containers import (
    ContainerEvent,
    ContainerStarted,
    ContainerStopped,
    IdMap,
    Runtime,
)
from hotrelay.runtimes.raw import CgroupAdapter, PidAdapter
from hotrelay.testing.containers import next_event_for
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.sandbox import CGROUP_ROOT, Sandbox
from hotrelay.testing.sandbox import IdMap as SandboxIdMap

pytestmark = pytest.mark.privileged


def relative_cgroup(sandbox: Sandbox) -> str:
    return "/" + str(sandbox.unified_cgroup.relative_to(CGROUP_ROOT / "unified"))


async def test_pid_target_matches_the_sandbox(sandbox: Sandbox) -> None:
    adapter = PidAdapter()
    [ref] = await adapter.resolve(str(sandbox.pid))
    expected = sandbox.ref()  # read by the sandbox harness, independently
    assert ref.runtime is Runtime.PID
    assert ref.name == str(sandbox.pid)
    assert (ref.pid, ref.start_time) == (expected.pid, expected.start_time)
    assert (ref.devices_cgroup, ref.unified_cgroup) == (
        expected.devices_cgroup,
        expected.unified_cgroup,
    )
    for kind, inode in expected.namespaces.items():
        assert ref.namespaces[kind] == inode
    assert ref.uid_map == expected.uid_map
    assert ref.host_network is False


async def test_cgroup_target_finds_the_namespace_init(make_sandbox: SandboxFactory) -> None:
    # The sandbox cgroup also holds its setup helper, an older process in the host's pid
    # namespace: the container's init is pid 1 of the new namespace, not the oldest.
    sandbox = make_sandbox(userns=SandboxIdMap(0, 100000, 65536))
    path = relative_cgroup(sandbox)
    [ref] = await CgroupAdapter().resolve(path)
    assert ref.runtime is Runtime.CGROUP
    assert (ref.name, ref.pid) == (path, sandbox.pid)
    assert ref.unified_cgroup == path
    assert ref.uid_map == IdMap.parse("0 100000 65536\n")
    assert not ref.privileged
    # The absolute form and a glob name the same container.
    [same] = await CgroupAdapter().resolve(f"/sys/fs/cgroup/unified{path}")
    assert same.pid == sandbox.pid
    globbed = await CgroupAdapter().resolve(path.rsplit("-", 1)[0] + "-*")
    assert [r.pid for r in globbed] == [sandbox.pid]
    assert await CgroupAdapter().resolve("/no/such/cgroup") == []


async def test_pid_and_cgroup_targets_are_followed(make_sandbox: SandboxFactory) -> None:
    first = make_sandbox()
    second = make_sandbox()
    first_name, second_name = str(first.pid), relative_cgroup(second)
    pid_adapter = PidAdapter([first.pid])
    cgroup_adapter = CgroupAdapter([second_name], poll_interval=0.1)
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(pid_adapter.watch, send.clone())
        await nursery.start(cgroup_adapter.watch, send)
        by_pid = await next_event_for(receive, first_name)
        by_cgroup = await next_event_for(receive, second_name)
        assert isinstance(by_pid, ContainerStarted)
        assert isinstance(by_cgroup, ContainerStarted)
        assert by_cgroup.container.pid == second.pid

        await trio.to_thread.run_sync(first.close)
        gone = await next_event_for(receive, first_name)
        assert gone == ContainerStopped(by_pid.container, "exited")
        await trio.to_thread.run_sync(second.close)
        gone = await next_event_for(receive, second_name)
        assert gone == ContainerStopped(by_cgroup.container, "exited")
        nursery.cancel_scope.cancel()
