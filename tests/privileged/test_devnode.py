"""Device nodes and symlinks in real containers, checked from inside them.

Every assertion about the node is made by a process inside the container (its
namespaces and cgroups, as its root): stat, open and read 4096 bytes. Sandboxes run
with devices="allow-all" so the device cgroup (another effector's job) is not in the
way; the LXC test grants the device with that effector, as the daemon would.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
import trio

from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceRule, DeviceType
from hotrelay.effectors.cgroups import DeviceGrants
from hotrelay.effectors.devnode import (
    DeviceNodes,
    NodeMethod,
    NodeRecord,
    SymlinkRecord,
    purge_host_nodes,
)
from hotrelay.effectors.nshelper import (
    HelperError,
    InjectionError,
    NamespaceHelpers,
    TargetExistsError,
    UnsafePathError,
)
from hotrelay.kernel import libc
from hotrelay.runtimes.lxc import LxcAdapter
from hotrelay.runtimes.names import resolve_owner
from hotrelay.testing.containers import LxcContainer, LxcHost, SessionDirs
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import open_inside, stat_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

P = ParamSpec("P")
R = TypeVar("R")

SANDBOXES: dict[str, IdMap | None] = {
    "privileged": None,
    "userns-0-0": IdMap(0, 0, 65536),
    "userns-0-100000": IdMap(0, 100000, 65536),
}


async def blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run a blocking harness call (a helper process inside) off the trio thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@pytest.fixture(params=list(SANDBOXES))
def box(request: pytest.FixtureRequest, make_sandbox: SandboxFactory) -> Sandbox:
    return make_sandbox(userns=SANDBOXES[request.param], devices="allow-all")


@pytest.fixture
async def helpers() -> AsyncIterator[NamespaceHelpers]:
    async with NamespaceHelpers() as pool:
        yield pool
    assert pool.running() == []


@pytest.fixture
def nodes_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nodes"


async def make(
    nodes: DeviceNodes, ref: ContainerRef, path: str, zram: ZramDevice, **options: Any
) -> NodeRecord:
    return await nodes.make_node(
        ref, path, type=DeviceType.BLOCK, major=zram.major, minor=zram.minor, **options
    )


def leftovers(nodes_dir: Path) -> list[str]:
    return sorted(os.listdir(nodes_dir)) if nodes_dir.exists() else []


def host_mode(zram: ZramDevice) -> int:
    return stat.S_IMODE(os.stat(zram.devnode).st_mode)


async def test_node_has_owner_group_mode_and_reads(
    box: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers, nodes_dir: Path
) -> None:
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)
    ref = box.ref()
    path = f"/dev/{zram.name}"

    record = await nodes.make_node(
        ref, path, type=DeviceType.BLOCK, major=zram.major, minor=zram.minor,
        mode=0o640, uid=1000, gid=6,
    )  # fmt: skip

    assert record.method is (NodeMethod.MKNOD if box.userns is None else NodeMethod.BIND)
    inside = await blocking(stat_inside, box, path)
    assert stat.S_ISBLK(inside.st_mode)
    assert inside.st_rdev == zram.devnum
    assert (stat.S_IMODE(inside.st_mode), inside.st_uid, inside.st_gid) == (0o640, 1000, 6)
    assert await blocking(open_inside, box, path, os.O_RDONLY, 4096) == 0
    assert leftovers(nodes_dir) == []

    removal = await nodes.remove_node(ref, record)

    assert removal.removed == (path,)
    assert removal.clean
    with pytest.raises(FileNotFoundError):
        await blocking(stat_inside, box, path)
    assert leftovers(nodes_dir) == []


async def test_rule_path_default_mode_symlink_and_directories(
    box: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers, nodes_dir: Path
) -> None:
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)
    ref = box.ref()
    # The container's own directory: we put a link below it but must never remove it.
    await blocking(box.run, ["mkdir", "/dev/serial"])
    link = "/dev/serial/by-id/usb-hotrelay-zigbee"

    node = await nodes.make_node(
        ref, "/dev/disks/zigbee", type=DeviceType.BLOCK, major=zram.major, minor=zram.minor,
        host_node=str(zram.devnode),
    )  # fmt: skip
    symlink = await nodes.make_symlink(ref, link, "../../disks/zigbee")

    assert node.created_dirs == ("/dev/disks",)
    assert symlink.created_dirs == ("/dev/serial/by-id",)
    inside = await blocking(stat_inside, box, link)  # follows the link, inside
    assert inside.st_rdev == zram.devnum
    # Defaults: the host node's mode, owned by the container's root.
    assert (stat.S_IMODE(inside.st_mode), inside.st_uid, inside.st_gid) == (host_mode(zram), 0, 0)
    assert await blocking(open_inside, box, link, os.O_RDONLY, 4096) == 0
    dirs = await blocking(stat_inside, box, "/dev/serial/by-id")
    assert (dirs.st_uid, dirs.st_gid) == (0, 0)

    assert (await nodes.remove_symlink(ref, symlink)).removed == (link,)
    assert (await nodes.remove_node(ref, node)).removed == ("/dev/disks/zigbee",)

    for gone in ("/dev/disks", "/dev/serial/by-id"):
        with pytest.raises(FileNotFoundError):
            await blocking(stat_inside, box, gone)
    assert stat.S_ISDIR((await blocking(stat_inside, box, "/dev/serial")).st_mode)
    assert leftovers(nodes_dir) == []


def host_view(path: str) -> tuple[int, int, int, int, float] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mode, st.st_uid, st.st_size, st.st_mtime)


@pytest.mark.parametrize("userns", ["privileged", "userns-0-100000"])
async def test_symlink_attacks_never_leave_the_containers_dev(
    make_sandbox: SandboxFactory,
    zram: ZramDevice,
    helpers: NamespaceHelpers,
    nodes_dir: Path,
    userns: str,
) -> None:
    # The sandbox shares the host's root filesystem: its /etc IS the host's /etc.
    box = make_sandbox(userns=SANDBOXES[userns], devices="allow-all")
    ref = box.ref()
    script = (
        "ln -s /etc /dev/bus && ln -s /proc/1/root/etc/shadow /dev/zigbee"
        " && ln -s / /dev/rootlink && mkdir /dev/real && ln -s /etc /dev/real/sub"
    )
    await blocking(box.run, ["sh", "-c", script])
    watched = ["/etc/shadow", "/etc/usb", "/etc/hotrelay-pwned", "/etc/x", "/etc/passwd"]
    before = {path: host_view(path) for path in watched}
    etc_before = sorted(os.listdir("/etc"))
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)

    with pytest.raises(UnsafePathError, match=r"/dev/bus is a symlink to '/etc'") as caught:
        await make(nodes, ref, "/dev/bus/usb/001/002", zram)
    assert caught.value.container == ref.target
    assert ref.target in str(caught.value)
    with pytest.raises(TargetExistsError, match="symlink to '/proc/1/root/etc/shadow'"):
        await make(nodes, ref, "/dev/zigbee", zram)
    with pytest.raises(UnsafePathError, match="/dev/rootlink is a symlink"):
        await make(nodes, ref, "/dev/rootlink/etc/hotrelay-pwned", zram)
    with pytest.raises(UnsafePathError, match="/dev/real/sub is a symlink"):
        await nodes.make_symlink(ref, "/dev/real/sub/x", "/dev/null")
    with pytest.raises(TargetExistsError):
        await nodes.make_symlink(ref, "/dev/zigbee", "/dev/null")
    for bad in ("/dev/../etc/x", "/etc/passwd", "/dev/", "/dev/a//b", "dev/x"):
        with pytest.raises(UnsafePathError):
            await make(nodes, ref, bad, zram)
    # A forged (or stale) record pointing through the planted link removes nothing.
    forged = NodeRecord(
        ref.target, "/dev/bus/shadow", DeviceType.BLOCK, zram.major, zram.minor, 0o600, 0, 0,
        NodeMethod.MKNOD, created_dirs=("/dev/bus",),
    )  # fmt: skip
    removal = await nodes.remove_node(ref, forged)
    assert removal.removed == ()
    assert removal.left
    assert all("symlink" in why for _, why in removal.left)
    forged_link = SymlinkRecord(ref.target, "/dev/zigbee", "elsewhere")
    assert (await nodes.remove_symlink(ref, forged_link)).removed == ()

    assert {path: host_view(path) for path in watched} == before
    assert sorted(os.listdir("/etc")) == etc_before
    # The planted links are still the container's own, untouched.
    bus = await blocking(stat_inside, box, "/dev/zigbee", follow_symlinks=False)
    assert stat.S_ISLNK(bus.st_mode)
    # The helper that refused all that goes on serving.
    helper_pid = (await helpers.get(ref)).helper_pid
    record = await make(nodes, ref, f"/dev/{zram.name}", zram)
    assert (await helpers.get(ref)).helper_pid == helper_pid
    assert await blocking(open_inside, box, f"/dev/{zram.name}", os.O_RDONLY, 4096) == 0
    assert (await nodes.remove_node(ref, record)).clean
    assert leftovers(nodes_dir) == []


async def test_existing_file_is_left_alone_and_reported(
    make_sandbox: SandboxFactory, zram: ZramDevice, helpers: NamespaceHelpers, nodes_dir: Path
) -> None:
    box = make_sandbox(userns=SANDBOXES["userns-0-100000"], devices="allow-all")
    ref = box.ref()
    path = f"/dev/{zram.name}"
    await blocking(box.run, ["sh", "-c", f"echo mine > {path}"])
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)

    with pytest.raises(TargetExistsError, match=r"already exists as a regular file \(5 bytes\)"):
        await nodes.make_node(ref, path, type=DeviceType.BLOCK, major=zram.major, minor=zram.minor)

    assert (await blocking(box.run, ["cat", path])).stdout == b"mine\n"
    assert leftovers(nodes_dir) == []


@pytest.mark.parametrize("userns", ["privileged", "userns-0-100000"])
async def test_removal_is_idempotent_and_spares_replacements(
    make_sandbox: SandboxFactory,
    zram: ZramDevice,
    helpers: NamespaceHelpers,
    nodes_dir: Path,
    userns: str,
) -> None:
    box = make_sandbox(userns=SANDBOXES[userns], devices="allow-all")
    ref = box.ref()
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)
    first = await make(nodes, ref, "/dev/sub/a", zram)
    second = await make(nodes, ref, "/dev/sub/b", zram)
    assert first.created_dirs == ("/dev/sub",)
    assert second.created_dirs == ()

    # The container swaps our node for a file of its own: that file is not ours.
    unmount = "umount /dev/sub/a; " if box.userns is not None else ""
    await blocking(box.run, ["sh", "-c", f"{unmount}rm -f /dev/sub/a && echo own > /dev/sub/a"])
    removal = await nodes.remove_node(ref, first)
    assert removal.removed == ()
    assert ("/dev/sub/a", "is now a regular file (4 bytes); left alone") in removal.left
    assert any(path == "/dev/sub" for path, _ in removal.left)  # not empty: kept
    assert (await blocking(box.run, ["cat", "/dev/sub/a"])).stdout == b"own\n"

    assert (await nodes.remove_node(ref, second)).removed == ("/dev/sub/b",)
    again = await nodes.remove_node(ref, second)
    assert again.removed == ()
    assert again.clean
    await blocking(box.run, ["rm", "/dev/sub/a"])
    assert (await nodes.remove_node(ref, first)).clean  # now /dev/sub goes too
    with pytest.raises(FileNotFoundError):
        await blocking(stat_inside, box, "/dev/sub")


async def test_records_survive_a_restart_of_the_daemon_side(
    make_sandbox: SandboxFactory, zram: ZramDevice, nodes_dir: Path
) -> None:
    box = make_sandbox(userns=SANDBOXES["userns-0-100000"], devices="allow-all")
    ref = box.ref()
    async with NamespaceHelpers() as first_life:
        nodes = DeviceNodes(first_life, nodes_dir=nodes_dir)
        node = await nodes.make_node(
            ref, "/dev/ttyHR/zigbee", type=DeviceType.BLOCK, major=zram.major, minor=zram.minor,
            mode=0o660, uid=0, gid=20,
        )  # fmt: skip
        link = await nodes.make_symlink(ref, "/dev/serial/by-id/zb", "../../ttyHR/zigbee")
        saved = json.dumps({"node": node.to_json(), "link": link.to_json()})

    # A new daemon (new helpers) undoes exactly what the saved records say.
    loaded = json.loads(saved)
    assert NodeRecord.from_json(loaded["node"]) == node
    assert SymlinkRecord.from_json(loaded["link"]) == link
    async with NamespaceHelpers() as second_life:
        nodes = DeviceNodes(second_life, nodes_dir=nodes_dir)
        assert (await nodes.remove_symlink(ref, SymlinkRecord.from_json(loaded["link"]))).clean
        assert (await nodes.remove_node(ref, NodeRecord.from_json(loaded["node"]))).clean
    for gone in ("/dev/ttyHR", "/dev/serial"):
        with pytest.raises(FileNotFoundError):
            await blocking(stat_inside, box, gone)


def is_reaped(pid: int) -> bool:
    """Our child is gone for good: neither running nor a zombie waiting for us."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return True
    # Still there: it must be some other process that got the pid since, not our child.
    return fields[0] != "Z" and int(fields[1]) != os.getpid()


async def test_helper_is_restarted_after_it_dies_and_always_reaped(
    sandbox: Sandbox, zram: ZramDevice, nodes_dir: Path
) -> None:
    ref = sandbox.ref()
    async with NamespaceHelpers() as pool:
        nodes = DeviceNodes(pool, nodes_dir=nodes_dir)
        first = await pool.get(ref)
        # Our own child, by its pid (never by name).
        os.kill(first.helper_pid, signal.SIGKILL)
        with pytest.raises(InjectionError, match="namespace helper exited"):
            await first.ping()
        record = await nodes.make_node(
            ref, "/dev/after-restart", type=DeviceType.BLOCK, major=zram.major, minor=zram.minor
        )
        second = await pool.get(ref)
        assert second.helper_pid != first.helper_pid
        assert is_reaped(first.helper_pid)
        assert (await nodes.remove_node(ref, record)).clean
    assert is_reaped(second.helper_pid)


async def test_stuck_helper_is_killed_at_its_deadline_or_on_cancel(sandbox: Sandbox) -> None:
    # SIGSTOP stands in for a helper stuck in the container's filesystem (a FUSE /dev).
    ref = sandbox.ref()
    async with NamespaceHelpers(request_timeout=0.3) as pool:
        stuck = await pool.get(ref)
        os.kill(stuck.helper_pid, signal.SIGSTOP)
        with pytest.raises(HelperError, match=r"ping did not finish within 0.3 s"):
            await stuck.ping()
        assert is_reaped(stuck.helper_pid)

        cancelled = await pool.get(ref)
        assert cancelled.helper_pid != stuck.helper_pid
        os.kill(cancelled.helper_pid, signal.SIGSTOP)
        with trio.move_on_after(0.1) as scope:
            await cancelled.ping()
        assert scope.cancelled_caught  # the cancellation went through, not swallowed
        assert not cancelled.alive  # a late reply can never answer the next request
        assert is_reaped(cancelled.helper_pid)

        assert await (await pool.get(ref)).ping() not in (stuck.helper_pid, cancelled.helper_pid)


async def test_helper_exits_when_the_container_dies(make_sandbox: SandboxFactory) -> None:
    box = make_sandbox(userns=SANDBOXES["userns-0-100000"])
    async with NamespaceHelpers() as pool:
        helper = await pool.get(box.ref())
        await helper.ping()
        box.close()
        with trio.fail_after(5):
            await helper.wait_exited()
        with pytest.raises(InjectionError, match="cannot open its namespaces"):
            await pool.get(helper.container)
    assert is_reaped(helper.helper_pid)


async def test_bind_works_from_a_nodev_state_dir(
    make_sandbox: SandboxFactory, zram: ZramDevice, helpers: NamespaceHelpers, tmp_path: Path
) -> None:
    # /run is mounted nodev on most hosts; the detached node mount must not inherit it.
    state = tmp_path / "run"
    state.mkdir()
    libc.mount("tmpfs", state, "tmpfs", libc.MS_NODEV, "mode=755")
    try:
        box = make_sandbox(userns=SANDBOXES["userns-0-100000"], devices="allow-all")
        nodes = DeviceNodes(helpers, nodes_dir=state / "hotrelay" / "nodes")
        record = await nodes.make_node(
            box.ref(), "/dev/zr", type=DeviceType.BLOCK, major=zram.major, minor=zram.minor
        )
        assert await blocking(open_inside, box, "/dev/zr", os.O_RDONLY, 4096) == 0
        assert (await nodes.remove_node(box.ref(), record)).clean
        assert leftovers(state / "hotrelay" / "nodes") == []
    finally:
        libc.umount2(state, libc.MNT_DETACH)


def test_purge_removes_crash_leftovers(tmp_path: Path) -> None:
    nodes_dir = tmp_path / "nodes"
    nodes_dir.mkdir(mode=0o700)
    os.mknod(nodes_dir / "pid-1-253-0-abc", stat.S_IFBLK | 0o600, os.makedev(253, 0))
    assert purge_host_nodes(nodes_dir) == ["pid-1-253-0-abc"]
    assert leftovers(nodes_dir) == []
    assert purge_host_nodes(tmp_path / "missing") == []


# -- a real container: LXC, unprivileged (and privileged) ------------------------------


def lxc_attach(container: LxcContainer, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["lxc-attach", "-P", str(container.host.lxcpath), "-n", container.name, "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("unprivileged", [True, False], ids=["unprivileged", "privileged"])
async def test_real_lxc_container(
    lxc_host: LxcHost,
    runtime_dirs: SessionDirs,
    zram: ZramDevice,
    helpers: NamespaceHelpers,
    nodes_dir: Path,
    unprivileged: bool,
) -> None:
    container = lxc_host.create(runtime_dirs.name("dn"), unprivileged=unprivileged)
    try:
        await blocking(container.start)
        [ref] = await LxcAdapter([lxc_host.lxcpath]).resolve(container.name)
        assert ref.user_namespaced is unprivileged
        # "dialout" from the container's own /etc/group (gid 20 in the busybox rootfs).
        owner = await blocking(resolve_owner, ref, user="root", group="dialout")
        grants = DeviceGrants()
        grant = grants.grant(ref, DeviceRule(DeviceType.BLOCK, zram.major, zram.minor))
        try:
            nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)
            record = await nodes.make_node(
                ref, "/dev/zigbee", type=DeviceType.BLOCK, major=zram.major, minor=zram.minor,
                mode=0o660, uid=owner.uid, gid=owner.gid,
            )  # fmt: skip
            seen = await blocking(
                lxc_attach, container, "stat", "-c", "%F %a %U %G %t:%T", "/dev/zigbee"
            )
            assert seen.stdout.split() == [
                "block", "special", "file", "660", "root", "dialout",
                f"{zram.major:x}:{zram.minor:x}",
            ]  # fmt: skip
            read = await blocking(
                lxc_attach, container, "dd", "if=/dev/zigbee", "of=/dev/null", "bs=4096", "count=1"
            )
            assert read.returncode == 0, read.stderr
            assert leftovers(nodes_dir) == []

            assert (await nodes.remove_node(ref, record)).clean
            gone = await blocking(lxc_attach, container, "ls", "/dev/zigbee")
            assert gone.returncode != 0
            assert leftovers(nodes_dir) == []
        finally:
            grants.revoke(grant)
            grants.close()
        await helpers.close(ref)
    finally:
        await blocking(container.destroy)


async def test_node_checks_need_no_helper_on_a_tmpfs_dev(
    box: Sandbox, zram: ZramDevice, helpers: NamespaceHelpers, nodes_dir: Path
) -> None:
    """The heal pass asks whether each node is still there every few seconds: on a
    tmpfs /dev the daemon looks itself (confined to that tmpfs), so idle helpers can
    be closed; what lies on another mount goes to the helper."""
    nodes = DeviceNodes(helpers, nodes_dir=nodes_dir)
    ref = box.ref()
    path = f"/dev/checked/{zram.name}"
    record = await make(nodes, ref, path, zram)
    assert await helpers.node_exists(ref, path)
    assert await helpers.close_idle(now=float("inf")) == 1
    assert helpers.running() == []
    assert await helpers.node_exists(ref, path)
    assert not await helpers.node_exists(ref, "/dev/checked/nothing-here")
    assert helpers.running() == []  # answered without a helper
    box.run(["sh", "-c", f"umount {path} 2>/dev/null; rm {path}"])  # the container's doing
    assert not await helpers.node_exists(ref, path)
    box.run(["ln", "-s", "/etc/passwd", path])  # something the container put there
    assert await helpers.node_exists(ref, path)
    box.run(["rm", path])
    box.run(["mkdir", "/dev/other"])
    box.run(["mount", "-t", "tmpfs", "other", "/dev/other"])
    box.run(["touch", "/dev/other/file"])
    assert await helpers.node_exists(ref, "/dev/other/file")  # another mount: the helper
    assert len(helpers.running()) == 1
    box.run(["umount", "/dev/other"])
    box.run(["rmdir", "/dev/other"])
    await nodes.remove_node(ref, record)
