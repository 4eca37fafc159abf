"""cgroup v1 device grants against the real kernel, checked by open() from inside.

Every sandbox here has its own devices cgroup (created by the harness); grants and
revokes only ever touch those, never the test's own cgroup.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule, parse_devices_list
from hotrelay.effectors import GrantError, cgroup_v1
from hotrelay.effectors.cgroups import DeviceGrants, GrantRecord
from hotrelay.runtimes.procfs import snapshot
from hotrelay.testing.containers import LxcHost, RuncRoot, SessionDirs
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import open_inside
from hotrelay.testing.sandbox import Sandbox

pytestmark = pytest.mark.privileged

DEVICES = Path("/sys/fs/cgroup/devices")

OPEN_ERRNO = """
import os, sys
try:
    os.close(os.open(sys.argv[1], int(sys.argv[2])))
    print(0)
except OSError as exc:
    print(exc.errno)
"""


def open_from(sandbox: Sandbox, cgroups: list[Path], path: str, flags: int = os.O_RDONLY) -> int:
    """open() inside the sandbox's mount namespace by a process in ``cgroups``."""
    join = " && ".join(f"echo $$ > {cg / 'cgroup.procs'}" for cg in cgroups)
    script = f'{join} && exec nsenter -t {sandbox.pid} -m -p -- "$@"'
    argv = ["sh", "-c", script, "open-from", sys.executable, "-c", OPEN_ERRNO, path, str(flags)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return int(result.stdout.strip())


def mknod_inside(sandbox: Sandbox, zram: ZramDevice) -> str:
    path = f"/dev/{zram.name}"
    sandbox.run(["mknod", path, "b", str(zram.major), str(zram.minor)])
    return path


def devices_list(sandbox: Sandbox, child: str = "") -> tuple[DeviceRule, ...]:
    return parse_devices_list((sandbox.devices_cgroup / child / "devices.list").read_text())


def v1_only() -> DeviceGrants:
    return DeviceGrants(unified_root=None)


def test_grant_then_revoke_zram(sandbox: Sandbox, zram: ZramDevice) -> None:
    node = mknod_inside(sandbox, zram)
    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")
    grants = v1_only()
    assert open_inside(sandbox, node, read=4096) == errno.EPERM

    record = grants.grant(sandbox.ref(), rule)
    assert record.v1 is not None
    assert record.v2 is None
    assert record.v1.entries == (cgroup_v1.V1Entry(sandbox.ref().devices_cgroup or "", "rw"),)
    assert open_inside(sandbox, node, os.O_RDWR, read=4096) == 0
    # The record survives the daemon's ledger.
    assert GrantRecord.from_json(json.loads(json.dumps(record.to_json()))) == record

    grants.revoke(record)
    assert open_inside(sandbox, node, read=4096) == errno.EPERM
    assert rule.render() not in {r.render() for r in devices_list(sandbox)}
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0


def test_pre_allowed_device_stays_allowed(sandbox: Sandbox, zram: ZramDevice) -> None:
    node = mknod_inside(sandbox, zram)
    before = devices_list(sandbox)
    grants = v1_only()

    # /dev/null: the runtime's own exact entry.
    null = grants.grant(sandbox.ref(), DeviceRule.parse("c 1:3 rwm"))
    assert null.v1 is not None
    assert not null.v1.changed
    # mknod of any block device: covered by the runtime's "b *:* m" wildcard.
    mknod = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} m"))
    assert mknod.v1 is not None
    assert not mknod.v1.changed
    grants.revoke(null)
    grants.revoke(mknod)
    assert devices_list(sandbox) == before
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0

    # Partly allowed before: the runtime gave read; we add write and take back only write.
    exact_read = f"b {zram.major}:{zram.minor} r"
    (sandbox.devices_cgroup / "devices.allow").write_text(exact_read)
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert record.v1 is not None
    assert (record.v1.entries[0].added, record.v1.entries[0].kept) == ("w", "r")
    assert open_inside(sandbox, node, os.O_RDWR) == 0
    grants.revoke(record)
    assert open_inside(sandbox, node, os.O_RDONLY, read=4096) == 0
    assert open_inside(sandbox, node, os.O_RDWR) == errno.EPERM
    assert exact_read in {r.render() for r in devices_list(sandbox)}


def test_nested_child_cgroup_gets_the_grant(sandbox: Sandbox, zram: ZramDevice) -> None:
    node = mknod_inside(sandbox, zram)
    child = sandbox.devices_cgroup / "inner"
    child.mkdir()  # inherits the parent's whitelist
    cgroups = [child, sandbox.unified_cgroup]
    assert open_from(sandbox, cgroups, node) == errno.EPERM

    grants = v1_only()
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rwm"))
    assert record.v1 is not None
    assert [e.cgroup.rsplit("/", 1)[-1] for e in record.v1.entries] == [
        sandbox.devices_cgroup.name,
        "inner",
    ]
    assert open_from(sandbox, cgroups, node) == 0
    assert open_inside(sandbox, node) == 0

    grants.revoke(record)
    assert open_from(sandbox, cgroups, node) == errno.EPERM
    assert open_from(sandbox, cgroups, "/dev/null") == 0


def test_allow_all_cgroup_is_left_alone(make_sandbox: SandboxFactory, zram: ZramDevice) -> None:
    sandbox = make_sandbox(devices="allow-all")
    node = mknod_inside(sandbox, zram)
    grants = v1_only()
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert record.v1 is not None
    assert record.v1.entries[0].allow_all
    assert not record.v1.changed
    grants.revoke(record)
    assert open_inside(sandbox, node) == 0
    assert devices_list(sandbox) == (DeviceRule.parse("a *:* rwm"),)


def test_reconcile_heals_a_lost_entry(sandbox: Sandbox, zram: ZramDevice) -> None:
    node = mknod_inside(sandbox, zram)
    grants = v1_only()
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert grants.reconcile([record]).heals == 0

    # The runtime rewrites its list (docker update does deny + allow).
    (sandbox.devices_cgroup / "devices.deny").write_text(f"b {zram.major}:{zram.minor} rwm")
    assert open_inside(sandbox, node) == errno.EPERM
    result = grants.reconcile([record])
    assert (result.heals, result.errors) == (1, ())
    assert open_inside(sandbox, node) == 0
    grants.revoke(result.records[0])
    assert open_inside(sandbox, node) == errno.EPERM


def test_errors_are_clear_and_change_nothing(
    make_sandbox: SandboxFactory, zram: ZramDevice
) -> None:
    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")
    grants = v1_only()

    # A container whose cgroup is gone.
    gone = make_sandbox()
    ref = gone.ref()
    gone.close()
    with pytest.raises(GrantError, match=r"no such devices cgroup") as info:
        grants.grant(ref, rule)
    assert ref.devices_cgroup is not None
    assert ref.devices_cgroup in str(info.value)

    # A child may not allow what its parent denies: EPERM, named, nothing left behind.
    sandbox = make_sandbox()
    (sandbox.devices_cgroup / "inner").mkdir()
    inner = ContainerRef(
        runtime=ref.runtime,
        name="inner",
        pid=sandbox.pid,
        devices_cgroup=f"{sandbox.ref().devices_cgroup}/inner",
    )
    (sandbox.devices_cgroup / "devices.deny").write_text("b *:* m")  # nothing of b left
    before = devices_list(sandbox, "inner")
    with pytest.raises(GrantError, match=r"parent cgroup .* does not allow") as info:
        grants.grant(inner, DeviceRule.parse(f"b {zram.major}:{zram.minor} rwm"))
    assert info.value.errno == errno.EPERM
    assert "/inner" in str(info.value)
    assert f"{zram.major}:{zram.minor}" in str(info.value)
    assert devices_list(sandbox, "inner") == before

    # The root cgroup is the whole host: every container below it would get the device.
    host = ContainerRef(runtime=Runtime.PID, name="1", pid=1, devices_cgroup="/")
    with pytest.raises(GrantError, match="root cgroup"):
        grants.grant(host, rule)
    escape = ContainerRef(runtime=Runtime.PID, name="1", pid=1, devices_cgroup="/a/../..")
    with pytest.raises(GrantError, match="outside"):
        grants.grant(escape, rule)

    # Revoking on a cgroup that vanished since is not an error: nothing is left to undo.
    record = grants.grant(sandbox.ref(), rule)
    sandbox.close()
    grants.revoke(record)


# -- real runtimes (v1 on this host: none of them attaches a v2 program) --------------


def busybox_open(ref: ContainerRef, node: str) -> int:
    """Open node from inside a real container (its cgroups, its mount namespace), with
    the container's own busybox: 0, or EPERM when the device cgroup refuses."""
    cgroups = [DEVICES / (ref.devices_cgroup or "/").lstrip("/")]
    if ref.unified_cgroup is not None:
        cgroups.append(Path("/sys/fs/cgroup/unified") / ref.unified_cgroup.lstrip("/"))
    join = " && ".join(f"echo $$ > {cg / 'cgroup.procs'}" for cg in cgroups)
    script = f'{join} && exec nsenter -t {ref.pid} -m -- "$@"'
    argv = ["sh", "-c", script, "busybox-open", "/bin/busybox", "dd", f"if={node}",
            "of=/dev/null", "bs=4096", "count=1"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode == 0:
        return 0
    assert "Operation not permitted" in result.stderr, result.stderr
    return errno.EPERM


def grant_and_revoke_in(ref: ContainerRef, zram: ZramDevice) -> None:
    node = f"/dev/{zram.name}"
    # From the host's cgroup (allowed to mknod anything), into the container's /dev.
    subprocess.run(
        ["nsenter", "-t", str(ref.pid), "-m", "--", "/bin/busybox", "mknod", node, "b",
         str(zram.major), str(zram.minor)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    assert ref.devices_cgroup is not None
    before = parse_devices_list(
        (DEVICES / ref.devices_cgroup.lstrip("/") / "devices.list").read_text()
    )
    assert busybox_open(ref, node) == errno.EPERM
    grants = DeviceGrants()
    try:
        record = grants.grant(ref, DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
        assert record.v1 is not None
        assert record.v1.changed
        assert busybox_open(ref, node) == 0
        grants.revoke(record)
        assert busybox_open(ref, node) == errno.EPERM
        after = (DEVICES / ref.devices_cgroup.lstrip("/") / "devices.list").read_text()
        assert parse_devices_list(after) == before
    finally:
        grants.close()


# What LXC's common.conf (included by its templates) sets: a whitelist like OCI's.
LXC_DEVICE_CONFIG = "".join(
    f"lxc.cgroup.devices.{line}\n"
    for line in (
        "deny = a",
        "allow = c *:* m",
        "allow = b *:* m",
        "allow = c 1:3 rwm",
        "allow = c 1:5 rwm",
        "allow = c 1:8 rwm",
        "allow = c 1:9 rwm",
        "allow = c 5:0 rwm",
        "allow = c 5:2 rwm",
        "allow = c 136:* rwm",
    )
)


def test_grant_and_revoke_on_a_running_lxc_container(lxc_host: LxcHost, zram: ZramDevice) -> None:
    container = lxc_host.create(lxc_host.dirs.name("hrg"))
    with (container.path / "config").open("a") as config:
        config.write(LXC_DEVICE_CONFIG)
    container.start()
    try:
        pid = container.pid()
        assert pid is not None
        grant_and_revoke_in(snapshot(Runtime.LXC, container.name, pid), zram)
    finally:
        container.destroy()


def test_grant_and_revoke_on_a_running_runc_container(
    runc_root: RuncRoot, runtime_dirs: SessionDirs, zram: ZramDevice
) -> None:
    container_id = runtime_dirs.name("hrg")
    runc_root.run_container(container_id)
    try:
        pid = runc_root.state(container_id)["pid"]
        assert isinstance(pid, int)
        grant_and_revoke_in(snapshot(Runtime.RUNC, container_id, pid, id=container_id), zram)
    finally:
        runc_root.delete(container_id)
