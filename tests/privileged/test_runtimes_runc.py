"""runc: a busybox OCI bundle, resolved from state.json with runc's own device rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from hotrelay.core.containers import ContainerEvent, ContainerStarted, ContainerStopped, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.oci import OciAdapter
from hotrelay.testing.containers import RuncRoot, SessionDirs, next_event_for

pytestmark = pytest.mark.privileged

CHAR_TYPES = {97: "a", 98: "b", 99: "c"}


def rules_in_state_json(path: Path) -> list[str]:
    """runc's device rules rendered as devices.list lines, parsed here independently."""
    state = json.loads(path.read_text())
    lines = []
    for rule in state["config"]["cgroups"]["devices"]:
        major = "*" if rule["major"] == -1 else str(rule["major"])
        minor = "*" if rule["minor"] == -1 else str(rule["minor"])
        verb = "allow" if rule["allow"] else "deny"
        lines.append(f"{verb} {CHAR_TYPES[rule['type']]} {major}:{minor} {rule['permissions']}")
    return lines


async def test_resolved_from_state_json_with_base_device_rules(
    runc_root: RuncRoot, runtime_dirs: SessionDirs
) -> None:
    container_id = runtime_dirs.name("rc")
    runc_root.run_container(container_id)
    try:
        adapter = OciAdapter([runc_root.root])
        [ref] = await adapter.resolve(container_id)
        state = runc_root.state(container_id)  # `runc state`
        assert ref.runtime is Runtime.RUNC
        assert (ref.name, ref.id) == (container_id, container_id)
        assert ref.pid == state["pid"]
        assert ref.devices_cgroup == f"/{container_id}"  # runc's default cgroup path
        assert ref.privileged
        assert not ref.host_network
        expected = rules_in_state_json(runc_root.root / container_id / "state.json")
        got = [f"{'allow' if r.allow else 'deny'} {r.render()}" for r in ref.base_device_rules]
        assert got == expected
        # What runc applies for a spec without device rules: deny all, OCI defaults.
        assert ref.base_device_rules[0] == DeviceRule.parse("a", allow=False)
        assert DeviceRule.parse("c 1:3 rwm") in ref.base_device_rules
        assert DeviceRule.parse("c *:* m") in ref.base_device_rules
        assert await adapter.resolve("no-such-id") == []
        assert await adapter.resolve("../../etc") == []
    finally:
        runc_root.delete(container_id)


async def test_kill_and_rerun_are_observed(runc_root: RuncRoot, runtime_dirs: SessionDirs) -> None:
    container_id = runtime_dirs.name("rw")
    runc_root.run_container(container_id)
    adapter = OciAdapter([runc_root.root], poll_interval=0.2, resync_interval=3600)
    send, receive = trio.open_memory_channel[ContainerEvent](1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            first = await next_event_for(receive, container_id)
            assert isinstance(first, ContainerStarted)

            await trio.to_thread.run_sync(runc_root.runc, "kill", container_id, "KILL")
            stopped = await next_event_for(receive, container_id)
            assert stopped == ContainerStopped(first.container, "exited")

            # Same id again: state.json changes, the fingerprint poll sees it.
            await trio.to_thread.run_sync(runc_root.delete, container_id)
            await trio.to_thread.run_sync(runc_root.run_container, container_id)
            again = await next_event_for(receive, container_id)
            assert isinstance(again, ContainerStarted)
            assert again.container.pid == runc_root.state(container_id)["pid"]
            assert again.container.pid != first.container.pid
            nursery.cancel_scope.cancel()
    finally:
        runc_root.delete(container_id)


async def test_no_state_directory_is_skipped(tmp_path: Path) -> None:
    adapter = OciAdapter([tmp_path / "none", tmp_path / "glob*"])
    assert await adapter.list_running() == []
    assert adapter.unavailable_reason is not None
