"""Forged uevents against the real daemon: dropped, counted, never acted on.

A forged event names a device that does not exist (zram250, the zram major, minor
250) but that the daemon's rule would relay: if any forged message were believed, a
node /dev/disks/zram250 would appear in the target container and ``b MAJ:250`` in its
devices.list. The last step of the group-1 test hands the very same message to the
kernel as host root (UEVENT_SEND, so it arrives from port id 0, a trusted sender): it
is dropped too, by the second check, because sysfs has no block device MAJ:250
(test_adversarial_udevd.py has the attacks that check is for). Everything else must
be dropped and show in the daemon's ``status`` counters, and the daemon must go on
relaying real hotplug afterwards. On group 2 only udevd is believed: here a stand-in
(fake_udevd.py) at a control socket of the test's own.

test_source.py covers the event source's trust rules on its own; this is the whole
daemon: source, pump, relay and effectors, watched through its monitor feed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from adversarial_support import (
    Monitor,
    grant_listed,
    inside_state,
    ledger_for,
    netlink_portids,
    status_counters,
    uevent_sender,
    zram_rules,
)
from fake_udevd import FakeUdevd

from hotrelay.core.uevent import Uevent, Wire, serialize
from hotrelay.kernel import netlink
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import UeventListener, send_uevent_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

FORGED_NAME = "zram250"
FORGED_DEVPATH = f"/devices/virtual/block/{FORGED_NAME}"
FORGED_NODE = f"/dev/disks/{FORGED_NAME}"
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def forged(major: int, action: str = "add", *, seqnum: int | None = 10**15) -> Uevent:
    props = {
        "ACTION": action,
        "DEVPATH": FORGED_DEVPATH,
        "SUBSYSTEM": "block",
        "MAJOR": str(major),
        "MINOR": "250",
        "DEVNAME": FORGED_NAME,
        "DEVTYPE": "disk",
    }
    if seqnum is not None:
        props["SEQNUM"] = str(seqnum)  # far ahead: never mistaken for a duplicate
    return Uevent.from_properties(props)


@pytest.fixture
def sandboxes() -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sandbox in made:
        sandbox.close()


def untouched(daemon: RunningDaemon, box: Sandbox, major: int) -> None:
    """Nothing of the forged device anywhere: inside, in the cgroup, in the ledger."""
    assert inside_state(box, [FORGED_NODE]) == {FORGED_NODE: "absent"}
    assert f"b {major}:250 " not in (box.devices_cgroup / "devices.list").read_text()
    assert ledger_for(daemon, FORGED_DEVPATH) == []
    assert not any(g["device"].endswith(FORGED_NAME) for g in daemon.grants())


def relayed(box: Sandbox, zram: ZramDevice) -> bool:
    return inside_state(box, [f"/dev/disks/{zram.name}"])[f"/dev/disks/{zram.name}"] == "ok"


def test_forged_kernel_group_messages_are_dropped(sandboxes: list[Sandbox]) -> None:
    box = Sandbox.create(devices="default-deny")
    sandboxes.append(box)
    intruder = Sandbox.create(userns=IdMap(0, 100000, 65536), devices="default-deny")
    sandboxes.append(intruder)
    with (
        ZramDevice() as probe,
        RunningDaemon(zram_rules(f"pid:{box.pid}"), config='source = "kernel"\n') as daemon,
        Monitor(daemon) as monitor,
    ):
        assert daemon.process is not None
        (portid, groups), *_ = netlink_portids(daemon.process.pid)
        assert groups == netlink.KERNEL_GROUP
        add = serialize(forged(probe.major))
        before = status_counters(daemon)
        # Inside the intruder (root of a user namespace, its own netns): what it sends
        # stays in its netns. Its listener proves the messages really went out.
        with UeventListener.start(intruder, group=1) as heard_inside:
            send_uevent_inside(intruder, add, via="multicast", group=1)
            sent = send_uevent_inside(
                intruder, serialize(forged(probe.major, seqnum=None)), via="kernel"
            )
            assert sent.error == 0  # its own kernel rebroadcast it, from port 0...
            heard_inside.wait_for(lambda m: m.port == 0 and FORGED_NAME in m.header, timeout=5)
        # ...and a privileged container's netns is no way in either.
        assert (
            send_uevent_inside(box, serialize(forged(probe.major, seqnum=None)), via="kernel").error
            == 0
        )
        with uevent_sender() as spoof:
            spoof.sendto(add, (0, netlink.KERNEL_GROUP))  # host root, multicast, port != 0
            spoof.sendto(add, (portid, 0))  # unicast straight to the daemon's socket
            spoof.sendto(add + b"PAD=" + b"x" * (70 * 1024) + b"\0", (0, netlink.KERNEL_GROUP))
            spoof.sendto(add[:20], (0, netlink.KERNEL_GROUP))  # truncated mid-header
        # Trusted sender (the kernel, for host root), malformed message: the header
        # disagrees with the properties. Counted as malformed, not acted on.
        lying = (
            b"add@"
            + FORGED_DEVPATH.encode()
            + b"\0"
            + serialize(forged(probe.major, "remove", seqnum=None)).split(b"\0", 1)[1]
        )
        assert send_uevent_inside(None, lying, via="kernel").error == 0
        # A real event after all of it: once the pump handled it, it handled the rest.
        with ZramDevice() as marker:
            eventually(lambda: len(monitor.uevents(marker.devpath)) > 0, timeout=10)
            after = status_counters(daemon)
            assert after["source_dropped_untrusted"] - before["source_dropped_untrusted"] >= 4
            assert after["source_dropped_malformed"] - before["source_dropped_malformed"] >= 1
            assert monitor.uevents(FORGED_DEVPATH) == []
            untouched(daemon, box, probe.major)
            # The daemon goes on: real hotplug is relayed.
            eventually(lambda: relayed(box, marker), timeout=5)
        # The same forged add, given to the kernel by host root, arrives from port 0: a
        # trusted sender. The trust check lets it through; sysfs has no such device, so
        # the device-number check drops it before anything is granted.
        mismatched = status_counters(daemon)["dropped_mismatch"]
        assert (
            send_uevent_inside(
                None, serialize(forged(probe.major, seqnum=None)), via="kernel"
            ).error
            == 0
        )
        eventually(lambda: monitor.uevents(FORGED_DEVPATH) == [] and (
            status_counters(daemon)["dropped_mismatch"] > mismatched
        ), timeout=5)  # fmt: skip
        assert "does not exist" in (status_counters(daemon)["last_mismatch"] or "")
        untouched(daemon, box, probe.major)


# A non-root process sending to the udev group: the kernel itself refuses (uevent
# sockets allow non-root to receive, not to send). Prints the errno it got.
NONROOT_SENDER = """\
import socket, sys
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)
sock.bind((0, 0))
try:
    sock.sendto(bytes.fromhex(sys.argv[1]), (0, 2))
    print(0)
except OSError as exc:
    print(exc.errno)
"""


def libudev_with(props: bytes, *, length: int | None = None) -> bytes:
    genuine = serialize(forged(253), Wire.UDEV)
    header = bytearray(genuine[:40])
    header[20:24] = (len(props) if length is None else length).to_bytes(4, "little")
    return bytes(header) + props


def test_forged_udev_group_messages_are_dropped(sandboxes: list[Sandbox]) -> None:
    box = Sandbox.create(devices="default-deny")
    sandboxes.append(box)
    intruder = Sandbox.create(userns=IdMap(0, 100000, 65536), devices="default-deny")
    sandboxes.append(intruder)
    with (
        ZramDevice() as real,
        FakeUdevd() as udevd,
        RunningDaemon(
            zram_rules(f"pid:{box.pid}"),
            config=f'source = "udev"\nudev_control = "{udevd.control}"\n',
        ) as daemon,
        Monitor(daemon) as monitor,
    ):
        assert daemon.process is not None
        (portid, groups), *_ = netlink_portids(daemon.process.pid)
        assert groups == netlink.UDEV_GROUP
        add = serialize(forged(real.major), Wire.UDEV)
        before = status_counters(daemon)
        # A real non-root process cannot even send.
        nonroot = subprocess.run(
            [PYTHON, "-I", "-c", NONROOT_SENDER, add.hex()],
            user=1000,
            group=1000,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert int(nonroot.stdout) == errno.EPERM
        # Root of a user-namespaced container: its messages stay in its netns.
        send_uevent_inside(intruder, add, via="multicast", group=2)
        target = (0, netlink.UDEV_GROUP)
        with uevent_sender() as spoof:
            # Root claiming uid 1000 in SCM_CREDENTIALS (only root may claim another uid).
            spoof.sendmsg([add], [netlink.send_credentials(os.getpid(), 1000, 1000)], 0, target)
            spoof.sendmsg([add], [], 0, (portid, 0))  # root, but unicast: not udevd
            spoof.sendmsg([add], [], 0, target)  # root, multicast, but not udevd's pid
        # From udevd itself (a trusted sender), messages that are not well-formed.
        udevd.send(serialize(forged(real.major)))  # kernel wire
        props = add[40:]
        udevd.send(libudev_with(props, length=len(props) + 64))
        udevd.send(add + b"PAD=" + b"x" * (70 * 1024) + b"\0", worker=True)  # over 64 KiB
        # udevd's own message (its pid, multicast, libudev wire) for a real device:
        # trusted, relayed; it also marks the end of what came before.
        genuine = Uevent.from_properties(
            {
                "ACTION": "add",
                "DEVPATH": real.devpath,
                "SUBSYSTEM": "block",
                "MAJOR": str(real.major),
                "MINOR": str(real.minor),
                "DEVNAME": str(real.devnode),
                "DEVTYPE": "disk",
                "SEQNUM": str(10**15),
            },
            Wire.UDEV,
        )
        udevd.send(serialize(genuine))
        eventually(lambda: len(monitor.uevents(real.devpath)) > 0, timeout=10)
        after = status_counters(daemon)
        assert after["source_dropped_untrusted"] - before["source_dropped_untrusted"] >= 3
        assert after["source_dropped_malformed"] - before["source_dropped_malformed"] >= 2
        assert after["source_dropped_truncated"] - before["source_dropped_truncated"] >= 1
        assert "over" in (after["source_last_drop"] or "")
        assert monitor.uevents(FORGED_DEVPATH) == []
        untouched(daemon, box, real.major)
        eventually(lambda: relayed(box, real), timeout=5)
        assert grant_listed(box, real)
        # And udevd's remove takes it away again.
        remove = genuine.replace(ACTION="remove", SEQNUM=str(10**15 + 1))
        udevd.send(serialize(remove), worker=True)
        eventually(
            lambda: (
                inside_state(box, [f"/dev/disks/{real.name}"])[f"/dev/disks/{real.name}"]
                == "absent"
            ),
            timeout=5,
        )
        assert not grant_listed(box, real)
        status = json.dumps(daemon.status())
        assert FORGED_NAME not in status
