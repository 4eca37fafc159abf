"""The test harness itself against the real kernel: sandboxes, hotplug generators,
and the helpers that look from inside a sandbox."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from hotrelay.kernel import libc
from hotrelay.testing.fixtures import SandboxFactory, ZramFactory
from hotrelay.testing.hotplug import (
    VethPair,
    ZramDevice,
    synthetic_uevent_text,
    write_synthetic_uevent,
)
from hotrelay.testing.inside import (
    UeventListener,
    UeventMessage,
    open_inside,
    send_uevent_inside,
    stat_inside,
)
from hotrelay.testing.sandbox import (
    DEVICES_PARENT,
    OCI_DEFAULT_ALLOW,
    UNIFIED_PARENT,
    IdMap,
    Sandbox,
    open_sandbox,
    remove_cgroup_tree,
)

USERNS_MODES = {
    "privileged": None,
    "userns-0": IdMap(0, 0, 65536),
    "userns-100000": IdMap(0, 100000, 65536),
}
each_userns_mode = pytest.mark.parametrize(
    "userns", list(USERNS_MODES.values()), ids=list(USERNS_MODES)
)
OVERFLOW_ID = 65534


def host_id_of_inside_root(userns: IdMap | None) -> int:
    return 0 if userns is None else userns.to_outside(0)


def inside_id_of_host_root(userns: IdMap | None) -> int:
    """How a file owned by host root looks inside: unmapped ids show as the overflow id."""
    if userns is None or userns.outside == 0:
        return 0
    return OVERFLOW_ID


def proc_status(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.split()
    raise KeyError(field)


def pids_in_netns(netns_link: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "net") == netns_link:
                    pids.append(int(entry.name))
            # Gone meanwhile, or a process we may not inspect (this VM's own pid 1).
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return pids


class SandboxFacts(NamedTuple):
    pid: int
    helper_pid: int
    netns: str
    cgroups: tuple[Path, ...]


def sandbox_facts(sandbox: Sandbox) -> SandboxFacts:
    return SandboxFacts(
        pid=sandbox.pid,
        helper_pid=int(proc_status(sandbox.pid, "PPid")[0]),
        netns=os.readlink(sandbox.ns_path("net")),
        cgroups=sandbox.cgroups,
    )


def assert_sandbox_gone(facts: SandboxFacts) -> None:
    assert not Path(f"/proc/{facts.pid}").exists(), "pid 1 still exists (or is a zombie)"
    assert not Path(f"/proc/{facts.helper_pid}").exists(), "intermediate process still exists"
    assert pids_in_netns(facts.netns) == []
    for cgroup in facts.cgroups:
        assert not cgroup.exists()
    for parent in (DEVICES_PARENT, UNIFIED_PARENT):
        # The shared parent goes away with the last sandbox.
        assert not parent.exists() or any(p.is_dir() for p in parent.iterdir())


def uevent(header: str, **env: str) -> bytes:
    fields = [header, *(f"{key}={value}" for key, value in env.items())]
    return b"\0".join(field.encode() for field in fields) + b"\0"


def is_header(header: str) -> Callable[[UeventMessage], bool]:
    return lambda message: message.header == header


@pytest.fixture
def host_node_dir() -> Iterator[Path]:
    """A directory on the host's root fs (no nodev), visible inside every sandbox since
    they share the host's root; unlike pytest's tmp_path its parents are not mode 700."""
    path = Path(tempfile.mkdtemp(prefix="hotrelay-nodes-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def mknod_block(path: Path, device: ZramDevice, *, owner: int) -> Path:
    os.mknod(path, stat.S_IFBLK | 0o600, device.devnum)
    os.chown(path, owner, owner)
    return path


# -- the sandbox --------------------------------------------------------------------


@pytest.mark.privileged
@each_userns_mode
def test_sandbox_pid_is_pid_1_of_its_own_pid_namespace(
    make_sandbox: SandboxFactory, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)

    assert proc_status(sandbox.pid, "NSpid") == [str(sandbox.pid), "1"]
    # nsenter forks, so "echo $$" is not 1; compare what pid 1 inside is instead.
    inside_pid1 = sandbox.run(["cat", "/proc/1/cmdline"]).stdout
    assert inside_pid1 == Path(f"/proc/{sandbox.pid}/cmdline").read_bytes()
    inside_pidns = sandbox.run(["readlink", "/proc/self/ns/pid"]).stdout.decode().strip()
    assert inside_pidns == os.readlink(sandbox.ns_path("pid"))


@pytest.mark.privileged
@each_userns_mode
def test_sandbox_has_its_own_namespaces_and_run_enters_all_of_them(
    make_sandbox: SandboxFactory, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)

    for kind in ("mnt", "pid", "net", "uts", "ipc", "user"):
        host = os.readlink(f"/proc/self/ns/{kind}")
        own = os.readlink(sandbox.ns_path(kind))
        if kind == "user" and userns is None:
            assert own == host
        else:
            assert own != host, kind
        inside = sandbox.run(["readlink", f"/proc/self/ns/{kind}"]).stdout.decode().strip()
        assert inside == own, kind
    # /proc/net follows the reader's netns: a fresh one holds only loopback.
    interfaces = sandbox.run(["cat", "/proc/net/dev"]).stdout.decode().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
    assert sandbox.run(["hostname"]).stdout.decode().strip() == sandbox.name[:63]
    for cgroup in sandbox.cgroups:
        assert str(sandbox.pid) in (cgroup / "cgroup.procs").read_text().split()


@pytest.mark.privileged
@each_userns_mode
def test_sandbox_dev_is_a_fresh_tmpfs_holding_null(
    make_sandbox: SandboxFactory, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)

    assert sandbox.run(["stat", "-f", "-c", "%T", "/dev"]).stdout.strip() == b"tmpfs"
    dev = stat_inside(sandbox, "/dev")
    assert stat.S_ISDIR(dev.st_mode)
    assert stat.S_IMODE(dev.st_mode) == 0o755
    assert (dev.st_uid, dev.st_gid) == (0, 0)
    # The same directory seen from the host carries the mapped owner.
    host_view = os.stat(sandbox.root / "dev")
    assert host_view.st_uid == host_id_of_inside_root(userns)
    assert host_view.st_ino == dev.st_ino

    null = stat_inside(sandbox, "/dev/null")
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    # Privileged: mknod'ed by the sandbox's root; userns: the host's node bind-mounted.
    expected_owner = 0 if userns is None else inside_id_of_host_root(userns)
    assert null.st_uid == expected_owner
    assert sandbox.run(["sh", "-c", "echo discarded > /dev/null && wc -c < /dev/null"]).stdout == (
        b"0\n"
    )

    mounts = Path(f"/proc/{sandbox.pid}/mountinfo").read_text().splitlines()
    dev_mounts = [line.split(" - ")[1].split()[0] for line in mounts if line.split()[4] == "/dev"]
    proc_mounts = [line.split(" - ")[1].split()[0] for line in mounts if line.split()[4] == "/proc"]
    assert dev_mounts[-1] == "tmpfs"
    assert proc_mounts[-1] == "proc"


@pytest.mark.privileged
@each_userns_mode
def test_sandbox_id_maps(make_sandbox: SandboxFactory, userns: IdMap | None) -> None:
    sandbox = make_sandbox(userns=userns)

    if userns is None:
        expected = ["0", "0", "4294967295"]
    else:
        expected = [str(userns.inside), str(userns.outside), str(userns.count)]
    for map_file in ("uid_map", "gid_map"):
        assert Path(f"/proc/{sandbox.pid}/{map_file}").read_text().split() == expected
        assert sandbox.run(["cat", f"/proc/self/{map_file}"]).stdout.split() == [
            field.encode() for field in expected
        ]
    assert sandbox.run(["id", "-u"]).stdout.strip() == b"0"
    assert sandbox.run(["id", "-g"]).stdout.strip() == b"0"
    outside = str(host_id_of_inside_root(userns))
    assert proc_status(sandbox.pid, "Uid") == [outside] * 4
    assert proc_status(sandbox.pid, "Gid") == [outside] * 4


@pytest.mark.privileged
@each_userns_mode
def test_default_deny_allows_the_oci_whitelist_and_nothing_else(
    make_sandbox: SandboxFactory,
    zram: ZramDevice,
    host_node_dir: Path,
    userns: IdMap | None,
) -> None:
    sandbox = make_sandbox(userns=userns, devices="default-deny")
    permissive = make_sandbox(userns=userns, devices="allow-all")

    listed = (sandbox.devices_cgroup / "devices.list").read_text().splitlines()
    assert sorted(listed) == sorted(OCI_DEFAULT_ALLOW)
    assert (permissive.devices_cgroup / "devices.list").read_text().split() == ["a", "*:*", "rwm"]
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0
    assert open_inside(sandbox, "/dev/zero", read=16) == 0

    if userns is None:
        # b *:* m: mknod is allowed, using the node is not.
        for box in (sandbox, permissive):
            box.run(
                ["mknod", "-m", "0600", f"/dev/{zram.name}", "b", str(zram.major), str(zram.minor)]
            )
        node = f"/dev/{zram.name}"
    else:
        # mknod needs CAP_MKNOD in the initial user namespace.
        refused = sandbox.run(
            ["mknod", "/dev/x", "b", str(zram.major), str(zram.minor)], check=False
        )
        assert refused.returncode != 0
        assert b"Operation not permitted" in refused.stderr
        node = str(
            mknod_block(host_node_dir / zram.name, zram, owner=host_id_of_inside_root(userns))
        )

    assert open_inside(sandbox, node) == errno.EPERM
    assert open_inside(sandbox, node, os.O_RDWR) == errno.EPERM
    # The same node opens and reads in an allow-all sandbox: EPERM came from the cgroup.
    assert open_inside(permissive, node, read=4096) == 0


@pytest.mark.privileged
@each_userns_mode
def test_userns_dev_tmpfs_refuses_device_nodes_like_a_real_unprivileged_container(
    make_sandbox: SandboxFactory, zram: ZramDevice, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns, devices="allow-all")
    node = sandbox.root / "dev" / zram.name

    if userns is not None and userns.outside != 0:
        # Host root's fsuid 0 has no mapping in the tmpfs's user namespace.
        with pytest.raises(OSError, match="Value too large") as refused:
            os.mknod(node, stat.S_IFBLK | 0o600, zram.devnum)
        assert refused.value.errno == errno.EOVERFLOW
        return
    os.mknod(node, stat.S_IFBLK | 0o600, zram.devnum)
    # A tmpfs mounted inside a user namespace is SB_I_NODEV: nodes on it never open.
    expected = 0 if userns is None else errno.EACCES
    assert open_inside(sandbox, f"/dev/{zram.name}", read=4096) == expected


@pytest.mark.privileged
@each_userns_mode
def test_close_leaves_no_process_and_no_cgroup(userns: IdMap | None) -> None:
    sandbox = Sandbox.create(userns=userns, name_prefix="close")
    facts = sandbox_facts(sandbox)
    background = sandbox.popen(["sleep", "1000"])
    for cgroup in sandbox.cgroups:
        (cgroup / "nested" / "deeper").mkdir(parents=True)
    listener = UeventListener.start(sandbox)  # left running on purpose

    sandbox.close()
    sandbox.close()

    assert background.returncode is not None
    assert not sandbox.is_running()
    assert_sandbox_gone(facts)
    listener.close()


@pytest.mark.privileged
def test_sandbox_context_manager_cleans_up_when_the_body_raises() -> None:
    facts: list[SandboxFacts] = []

    def failing_body() -> None:
        with open_sandbox() as sandbox:
            facts.append(sandbox_facts(sandbox))
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        failing_body()
    assert_sandbox_gone(facts[0])


@pytest.mark.privileged
def test_sandbox_fixture_cleans_up_after_a_failing_test(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_fails.py").write_text(
        "import json, os\n"
        "def test_fails(sandbox):\n"
        "    status = open(f'/proc/{sandbox.pid}/status').read()\n"
        "    facts = {'pid': sandbox.pid, 'netns': os.readlink(sandbox.ns_path('net')),\n"
        "             'helper_pid': int(status.split('PPid:')[1].split()[0]),\n"
        "             'cgroups': [str(cg) for cg in sandbox.cgroups]}\n"
        f"    open({str(record)!r}, 'w').write(json.dumps(facts))\n"
        "    raise AssertionError('deliberately failing')\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "hotrelay.testing.fixtures",
            "-p",
            "no:cacheprovider",
            "-c",
            str(tmp_path / "pytest.ini"),
            str(tmp_path),
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout.decode()
    assert b"deliberately failing" in result.stdout
    recorded = json.loads(record.read_text())
    recorded["cgroups"] = tuple(Path(cg) for cg in recorded["cgroups"])
    assert_sandbox_gone(SandboxFacts(**recorded))


@pytest.mark.privileged
def test_sandbox_dies_with_the_process_that_created_it() -> None:
    """No close() at all: the intermediate sees its control pipe hit EOF."""
    creator = (
        "import json, os\n"
        "from hotrelay.testing.sandbox import Sandbox\n"
        "sandbox = Sandbox.create(name_prefix='orphan')\n"
        "print(json.dumps({'pid': sandbox.pid, 'netns': os.readlink(sandbox.ns_path('net')),"
        " 'cgroups': [str(cg) for cg in sandbox.cgroups]}), flush=True)\n"
        "os._exit(0)\n"
    )
    # The orphaned intermediate is reparented to the nearest subreaper: make that a
    # process of ours, since this VM's pid 1 never reaps.
    reaper = (
        "import ctypes, os, subprocess, sys\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
        "subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.wait()\n"
        "    except ChildProcessError:\n"
        "        break\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", reaper, creator], capture_output=True, timeout=30, check=True
    )
    facts = json.loads(result.stdout)
    cgroups = tuple(Path(cg) for cg in facts["cgroups"])
    try:
        assert time.monotonic() - started < 5
        assert not Path(f"/proc/{facts['pid']}").exists()
        assert pids_in_netns(facts["netns"]) == []
    finally:
        # Nobody called close(): the cgroups are the one thing left to clean.
        for cgroup in cgroups:
            remove_cgroup_tree(cgroup)


@pytest.mark.privileged
def test_sandbox_init_reaps_orphans(sandbox: Sandbox) -> None:
    sandbox.run(["sh", "-c", "sleep 0.05 & exit 0"])
    deadline = time.monotonic() + 5
    while True:
        states = sandbox.run(["sh", "-c", "cat /proc/[0-9]*/stat"]).stdout.decode().splitlines()
        # Field 3, after the parenthesised command name, is the state.
        zombies = [line for line in states if line.rsplit(")", 1)[1].split()[0] == "Z"]
        if not zombies:
            break
        assert time.monotonic() < deadline, zombies
        time.sleep(0.02)


@pytest.mark.privileged
def test_sandbox_comes_up_fast() -> None:
    started = time.monotonic()
    with open_sandbox(userns=IdMap(0, 100000, 65536)):
        # About 60 ms here; the margin is for a loaded CI machine.
        assert time.monotonic() - started < 1.0


@pytest.mark.privileged
def test_failed_setup_leaves_nothing_behind() -> None:
    def children(parent: Path) -> set[str]:
        return {p.name for p in parent.iterdir() if p.is_dir()} if parent.exists() else set()

    before = {parent: children(parent) for parent in (DEVICES_PARENT, UNIFIED_PARENT)}
    # A map of zero ids is refused by the kernel after the helper has unshared.
    with pytest.raises(OSError, match="Invalid argument"):
        Sandbox.create(userns=IdMap(0, 100000, 0), name_prefix="broken")
    for parent, names in before.items():
        assert children(parent) == names


# -- hotplug generators ---------------------------------------------------------------


def proc_devices_major(name: str) -> int:
    for line in Path("/proc/devices").read_text().splitlines():
        fields = line.split()
        if fields[1:] == [name]:
            return int(fields[0])
    raise LookupError(name)


@pytest.mark.privileged
def test_zram_hot_add_creates_and_hot_remove_removes_the_node() -> None:
    with ZramDevice() as zram:
        assert zram.name == f"zram{zram.index}"
        st = os.stat(zram.devnode)
        assert stat.S_ISBLK(st.st_mode)
        assert os.major(st.st_rdev) == zram.major == proc_devices_major("zram")
        assert os.minor(st.st_rdev) == zram.minor
        assert zram.syspath == Path("/sys/block", zram.name).resolve()
        assert Path(zram.syspath, "size").read_text().strip() == "2048"  # 1 MiB of sectors
        with zram.devnode.open("rb") as device:
            assert device.read(4096) == bytes(4096)
    assert not zram.devnode.exists()
    assert not Path("/sys/block", zram.name).exists()
    zram.remove()  # idempotent


@pytest.mark.privileged
def test_make_zram_gives_distinct_devices(make_zram: ZramFactory) -> None:
    first, second = make_zram(), make_zram(disksize=None)
    assert first.index != second.index
    assert Path(second.syspath, "size").read_text().strip() == "0"


@pytest.mark.privileged
def test_veth_pair_appears_and_disappears() -> None:
    with VethPair() as pair:
        for name, index in ((pair.name, pair.index), (pair.peer_name, pair.peer_index)):
            assert name.startswith("hrt")
            assert len(name) <= 15
            assert int(Path("/sys/class/net", name, "ifindex").read_text()) == index
        peer_link = Path("/sys/class/net", pair.name, "iflink").read_text().strip()
        assert int(peer_link) == pair.peer_index
    assert not Path("/sys/class/net", pair.name).exists()
    assert not Path("/sys/class/net", pair.peer_name).exists()
    pair.delete()  # idempotent


@pytest.mark.privileged
def test_synthetic_uevent_reaches_a_host_netlink_socket(zram: ZramDevice) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15) as sock:
        sock.bind((0, 1))
        sock.settimeout(5)
        uuid = write_synthetic_uevent(zram.syspath, "change", args={"FOO": "bar", "N": "1"})
        header = f"change@{zram.devpath}".encode()
        while not (data := sock.recv(65536)).startswith(header + b"\0"):
            pass
    env = dict(field.split("=", 1) for field in data.decode().split("\0")[1:] if field)
    assert env["ACTION"] == "change"
    assert env["DEVPATH"] == zram.devpath
    assert env["SYNTH_UUID"] == uuid
    assert env["SYNTH_ARG_FOO"] == "bar"
    assert env["SYNTH_ARG_N"] == "1"
    assert env["MAJOR"] == str(zram.major)


@pytest.mark.privileged
def test_synthetic_uevent_text_rejects_what_the_kernel_would_silently_drop() -> None:
    assert synthetic_uevent_text("add") == "add"
    uuid = "0e6a6a6a-1111-2222-3333-444455556666"
    assert synthetic_uevent_text("change", uuid=uuid, args={"A": "1"}) == f"change {uuid} A=1"
    for bad in ({"A_B": "1"}, {"A": ""}, {"A": "x/y"}):
        with pytest.raises(ValueError, match="alphanumeric"):
            synthetic_uevent_text("change", args=bad)
    with pytest.raises(ValueError, match="not a uevent action"):
        synthetic_uevent_text("plug")


# -- looking from inside --------------------------------------------------------------


@pytest.mark.privileged
@each_userns_mode
def test_listener_inside_gets_its_netns_messages_and_kernel_uevents_only_under_init_userns(
    make_sandbox: SandboxFactory, make_zram: ZramFactory, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)
    with UeventListener.start(sandbox) as inside, UeventListener.start(None) as host:
        payload = uevent("add@/devices/hotrelay/test", ACTION="add", SEQNUM="1")
        sent = send_uevent_inside(sandbox, payload)
        message = inside.wait_for(lambda m: m.raw == payload)
        assert message.port == sent.port != 0
        assert (message.pid, message.uid, message.gid) == (sent.pid, 0, 0)

        zram = make_zram()
        with VethPair() as veth:
            zram_add = f"add@{zram.devpath}"
            veth_add = f"add@/devices/virtual/net/{veth.name}"
            # Broadcasts are queued before the write()/netlink call returns, so once the
            # host has both and a later marker reached the inside listener, anything the
            # inside listener has not got by then will never come.
            host.wait_for(is_header(zram_add))
            host.wait_for(is_header(veth_add))
            marker = uevent("change@/devices/hotrelay/marker", ACTION="change")
            send_uevent_inside(sandbox, marker)
            seen = inside.messages(until=lambda m: m.raw == marker, timeout=5)
        assert seen[-1].raw == marker
        headers = [m.header for m in seen]
        # Untagged (block) uevents go to every netns owned by the initial user
        # namespace, which includes the privileged sandbox's.
        assert (zram_add in headers) == (userns is None)
        if userns is None:
            kernel = seen[headers.index(zram_add)]
            assert (kernel.port, kernel.pid, kernel.uid) == (0, 0, 0)
        # Net device uevents are tagged with the device's netns: the host's only.
        assert veth_add not in headers
        # Nothing sent inside ever leaves the sandbox's netns.
        assert not any(m.raw == payload for m in host.messages(timeout=0))
        assert inside.errors == host.errors == []


@pytest.mark.privileged
@each_userns_mode
def test_kernel_rebroadcasts_uevents_sent_to_it_inside_the_netns(
    make_sandbox: SandboxFactory, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)
    payload = uevent("change@/devices/hotrelay/relayed", ACTION="change", DEVPATH="/x")
    with UeventListener.start(sandbox) as inside:
        sent = send_uevent_inside(sandbox, payload, via="kernel")
        assert sent.error == 0
        message = inside.wait_for(lambda m: m.raw.startswith(payload))
    assert message.port == 0
    assert int(message.env["SEQNUM"]) > 0
    # The kernel rewrites the uid to the netns owner's root, but keeps the sender's pid.
    assert (message.pid, message.uid, message.gid) == (sent.pid, 0, 0)


@pytest.mark.privileged
def test_host_listener_sees_kernel_uevents(make_zram: ZramFactory) -> None:
    with UeventListener.start(None) as host:
        zram = make_zram()
        message = host.wait_for(is_header(f"add@{zram.devpath}"))
        zram.remove()
        removed = host.wait_for(is_header(f"remove@{zram.devpath}"))
    assert (message.port, message.pid, message.uid, message.gid) == (0, 0, 0, 0)
    assert message.env["MAJOR"] == str(zram.major)
    assert message.env["DEVNAME"] == zram.name
    assert int(removed.env["SEQNUM"]) > int(message.env["SEQNUM"])


@pytest.mark.privileged
@each_userns_mode
def test_stat_inside_maps_owners(
    make_sandbox: SandboxFactory, host_node_dir: Path, userns: IdMap | None
) -> None:
    sandbox = make_sandbox(userns=userns)
    owned = host_node_dir / "owned-by-inside-root"
    owned.touch()
    os.chown(owned, host_id_of_inside_root(userns), host_id_of_inside_root(userns))
    root_owned = host_node_dir / "owned-by-host-root"
    root_owned.touch()

    assert stat_inside(sandbox, str(owned)).st_uid == 0
    assert stat_inside(sandbox, str(root_owned)).st_uid == inside_id_of_host_root(userns)
    with pytest.raises(FileNotFoundError):
        stat_inside(sandbox, str(host_node_dir / "missing"))


# -- libc -----------------------------------------------------------------------------


@pytest.mark.privileged
def test_libc_wrappers_raise_oserror_with_errno() -> None:
    with pytest.raises(OSError, match="setns") as bad_fd:
        libc.setns(-1, libc.CLONE_NEWNET)
    assert bad_fd.value.errno == errno.EBADF
    with pytest.raises(OSError, match="umount2") as missing:
        libc.umount2("/nonexistent/hotrelay", libc.MNT_DETACH)
    assert missing.value.errno == errno.ENOENT
    assert missing.value.filename == "/nonexistent/hotrelay"
    # Joining the namespace we are already in is allowed even with threads around.
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        libc.setns(fd, libc.CLONE_NEWNET)
    finally:
        os.close(fd)


@pytest.mark.privileged
def test_libc_unshare_in_a_fresh_process() -> None:
    script = (
        "import os\n"
        "from hotrelay.kernel import libc\n"
        "libc.unshare(libc.CLONE_NEWNET | libc.CLONE_NEWNS)\n"
        "libc.mount(None, '/', None, libc.MS_REC | libc.MS_PRIVATE, None)\n"
        "libc.mount('tmpfs', '/tmp', 'tmpfs', libc.MS_NOSUID, 'mode=0700')\n"
        "print(os.readlink('/proc/self/ns/net'), oct(os.stat('/tmp').st_mode & 0o777))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=30
    )
    netns, mode = result.stdout.decode().split()
    assert netns != os.readlink("/proc/self/ns/net")
    assert mode == "0o700"
