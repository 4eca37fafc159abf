"""Passing for udevd, lying about device numbers, and hostile property values, against
the real daemon.

The attacker of the security issue: a uid-0 process with only CAP_NET_ADMIN in the
host's network namespace (what a ``--net=host --cap-add NET_ADMIN`` container's root
is). It may multicast to udevd's netlink group, and it sends a libudev ``add`` whose
DEVPATH is a device a rule relays (``decoy``, a zram device) and whose MAJOR:MINOR is
another device (``victim``, a second zram device standing for the host's root disk: no
real host disk is ever involved). Believed, it would make the daemon grant the victim
to the container under the decoy's name.

Two checks stop it, each proved on its own: the sender is not udevd (its
SCM_CREDENTIALS pid is neither udevd's nor a worker's, and it cannot claim udevd's pid
without CAP_SYS_ADMIN), and the very same bytes sent by udevd itself, or handed to the
kernel by host root (UEVENT_SEND: a trusted kernel-group message), are dropped because
sysfs says victim's number is not decoy's. udevd is a stand-in (fake_udevd.py) at a
control socket of the test's own, so no /run/udev/control is ever made on the host.

The last test is the other item: a property "Kbd /dev/zigbee" must not become a second
DEVLINKS entry in the udev message replayed inside, and a property of many ``/`` must
not build a deep tree in the container's /dev.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from adversarial_support import (
    Monitor,
    grant_listed,
    inside_state,
    status_counters,
    zram_rules,
)
from fake_udevd import FakeUdevd

from hotrelay.core.uevent import Uevent, Wire, serialize
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice, write_synthetic_uevent
from hotrelay.testing.inside import UeventListener, send_uevent_inside
from hotrelay.testing.sandbox import Sandbox

pytestmark = pytest.mark.privileged

PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
SEQNUM = 10**15  # far ahead of the kernel's: never taken for a duplicate

# Runs as uid 0 with CAP_NET_ADMIN only (setpriv), in the host's netns. argv: the message
# in hex, udevd's pid. Tries to claim udevd's pid, then sends as itself.
ATTACKER = """
import json, socket, struct, sys
data, udevd_pid = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd"))]
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)
sock.bind((0, 0))
creds = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("=iII", udevd_pid, 0, 0))
try:
    sock.sendmsg([data], [creds], 0, (0, 2))
    claimed = 0
except OSError as exc:
    claimed = exc.errno
sent = sock.sendto(data, (0, 2))
uid = __import__("os").getuid()
print(json.dumps({"uid": uid, "caps": caps, "claimed": claimed, "sent": sent}))
"""


def attack_as_net_admin_root(message: bytes, udevd_pid: int) -> dict[str, object]:
    """Send ``message`` to the udev group as uid 0 holding CAP_NET_ADMIN and nothing else."""
    result = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all,+net_admin",
            "--",
            PYTHON,
            "-I",
            "-c",
            ATTACKER,
            message.hex(),
            str(udevd_pid),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def lie(decoy: ZramDevice, victim: ZramDevice, wire: Wire, **more: str) -> Uevent:
    """``add`` of the decoy's DEVPATH and name with the victim's device number."""
    props = {
        "ACTION": "add",
        "DEVPATH": decoy.devpath,
        "SUBSYSTEM": "block",
        "MAJOR": str(victim.major),
        "MINOR": str(victim.minor),
        "DEVNAME": str(decoy.devnode) if wire is Wire.UDEV else decoy.name,
        "DEVTYPE": "disk",
        **more,
    }
    return Uevent.from_properties(props, wire)


def genuine(device: ZramDevice, action: str = "change", **more: str) -> Uevent:
    return Uevent.from_properties(
        {
            "ACTION": action,
            "DEVPATH": device.devpath,
            "SUBSYSTEM": "block",
            "MAJOR": str(device.major),
            "MINOR": str(device.minor),
            "DEVNAME": str(device.devnode),
            "DEVTYPE": "disk",
            **more,
        },
        Wire.UDEV,
    )


@pytest.fixture
def box() -> Iterator[Sandbox]:
    sandbox = Sandbox.create(devices="default-deny")
    try:
        yield sandbox
    finally:
        sandbox.close()


def victim_unreachable(box: Sandbox, decoy: ZramDevice, victim: ZramDevice) -> None:
    """From the kernel and from inside: the victim is not the container's to open."""
    devices_list = (box.devices_cgroup / "devices.list").read_text()
    assert f"b {victim.major}:{victim.minor} " not in devices_list
    # The node the daemon made is still the decoy's, and opens.
    node = f"/dev/disks/{decoy.name}"
    assert inside_state(box, [node]) == {node: "ok"}
    rdev = box.run(["stat", "-c", "%t:%T", node]).stdout.decode().strip()
    assert rdev == f"{decoy.major:x}:{decoy.minor:x}"
    # The container's root making its own node of the victim (mknod of block devices is
    # in the OCI defaults): opening it is what the device cgroup refuses.
    made = box.run(
        ["sh", "-c", f"rm -f /dev/hr-victim; mknod /dev/hr-victim b {victim.major} {victim.minor}"
         " && dd if=/dev/hr-victim of=/dev/null bs=4096 count=1; status=$?;"
         " rm -f /dev/hr-victim; exit $status"],
        check=False,
    )  # fmt: skip
    assert made.returncode != 0
    assert b"Operation not permitted" in made.stderr, made.stderr


def test_net_admin_root_is_not_udevd_and_udevd_cannot_lie_about_numbers(
    box: Sandbox, tmp_path: Path
) -> None:
    with (
        ZramDevice() as decoy,
        ZramDevice() as victim,
        FakeUdevd(tmp_path / "control") as udevd,
        RunningDaemon(
            zram_rules(f"pid:{box.pid}", kernel=decoy.name),
            config=f'source = "udev"\nudev_control = "{udevd.control}"\n',
        ) as daemon,
        Monitor(daemon) as monitor,
    ):
        # Coldplug relays the decoy (sysfs says its number; the check agrees).
        eventually(lambda: inside_state(box, [f"/dev/disks/{decoy.name}"]) == {
            f"/dev/disks/{decoy.name}": "ok"}, timeout=10)  # fmt: skip
        assert f"udevd is pid {udevd.pid}" in daemon.log()
        before = status_counters(daemon)
        attack = serialize(lie(decoy, victim, Wire.UDEV, SEQNUM=str(SEQNUM)))

        # 1. The attacker: uid 0, CAP_NET_ADMIN only, host netns.
        outcome = attack_as_net_admin_root(attack, udevd.pid)
        assert outcome["uid"] == 0
        assert outcome["caps"] == [f"{1 << CAP_NET_ADMIN:016x}"] * 2  # CapEff, CapBnd
        assert outcome["claimed"] == 1  # EPERM: another pid needs CAP_SYS_ADMIN
        assert outcome["sent"] == len(attack)  # the kernel let it multicast...
        # 2. ...and the same lie from udevd itself, its manager and its worker.
        udevd.send(attack)
        udevd.send(serialize(lie(decoy, victim, Wire.UDEV, SEQNUM=str(SEQNUM + 1))), worker=True)
        # A genuine event after all of it: once the pump handled it, it handled the rest.
        udevd.send(serialize(genuine(decoy, SEQNUM=str(SEQNUM + 2), MARK="after")), worker=True)
        eventually(lambda: len(monitor.uevents(decoy.devpath)) > 0, timeout=10)

        after = status_counters(daemon)
        assert after["source_dropped_untrusted"] - before["source_dropped_untrusted"] >= 1
        assert f"is not udevd (pid {udevd.pid})" in after["source_last_drop"]
        assert after["dropped_mismatch"] - before["dropped_mismatch"] == 2
        assert after["last_mismatch"] == (
            f"add {decoy.devpath} (block {victim.major}:{victim.minor}): block device "
            f"{victim.major}:{victim.minor} is {victim.devpath}, not {decoy.devpath}"
        )
        # Logged once for the two identical lies.
        assert daemon.log().count("whose device number is not its device's") == 1
        # Never acted on: only the genuine change reached the relay.
        assert [e["action"] for e in monitor.uevents(decoy.devpath)] == ["change"], monitor.seen()
        victim_unreachable(box, decoy, victim)
        assert not any(victim.name in json.dumps(e) for e in daemon.ledger())
        assert all(g["device"] != str(victim.devnode) for g in daemon.grants())

        # udevd restarts: the new one is learned, the old pid is no longer believed.
        udevd.close()
        with FakeUdevd(udevd.control) as successor:
            marker = genuine(decoy, SEQNUM=str(SEQNUM + 3))
            eventually(
                lambda: (
                    successor.send(serialize(marker)) and len(monitor.uevents(decoy.devpath)) >= 2
                ),
                timeout=10,
                every=0.2,
            )
            assert f"udevd is pid {successor.pid}" in daemon.log()
            # Still relayed, still only the decoy.
            victim_unreachable(box, decoy, victim)
            assert grant_listed(box, decoy)


def test_trusted_kernel_message_with_another_devices_number_is_dropped(box: Sandbox) -> None:
    with (
        ZramDevice() as decoy,
        ZramDevice() as victim,
        RunningDaemon(
            zram_rules(f"pid:{box.pid}", kernel=decoy.name), config='source = "kernel"\n'
        ) as daemon,
        Monitor(daemon) as monitor,
    ):
        eventually(lambda: grant_listed(box, decoy), timeout=10)
        before = status_counters(daemon)
        # Host root (CAP_SYS_ADMIN) hands the kernel the lie: it arrives from port id 0.
        sent = send_uevent_inside(None, serialize(lie(decoy, victim, Wire.KERNEL)), via="kernel")
        assert sent.error == 0
        write_synthetic_uevent(decoy.syspath, "change", args={"MARK": "after"})
        eventually(lambda: len(monitor.uevents(decoy.devpath)) > 0, timeout=10)
        after = status_counters(daemon)
        assert after["source_dropped_untrusted"] == before["source_dropped_untrusted"]
        assert after["dropped_mismatch"] - before["dropped_mismatch"] == 1
        assert f"is {victim.devpath}, not {decoy.devpath}" in after["last_mismatch"]
        assert [e["action"] for e in monitor.uevents(decoy.devpath)] == ["change"]
        victim_unreachable(box, decoy, victim)


HOSTILE_RULES = """
[[rule]]
name = "kbd"
target = ["pid:{pid}"]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
[rule.device]
path = "/dev/disks/{{kernel}}"
symlinks = ["serial/by-id/{{ID_SERIAL}}"]
uevent = "udev"

[[rule]]
name = "deep"
target = ["pid:{pid}"]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
[rule.device]
path = "/dev/deep/{{kernel}}"
symlinks = ["by-path/{{ID_PATH}}"]
uevent = "udev"
"""


def test_property_values_make_no_fake_devlinks_and_no_deep_tree(box: Sandbox) -> None:
    with (
        ZramDevice() as kbd,
        FakeUdevd() as udevd,
        RunningDaemon(
            {"10-hostile.toml": HOSTILE_RULES.format(pid=box.pid, kernel=kbd.name)},
            config=f'source = "udev"\nudev_control = "{udevd.control}"\n',
        ) as daemon,
        UeventListener.start(box, group=2) as inside,
    ):
        hostile = genuine(
            kbd,
            "add",
            SEQNUM=str(SEQNUM),
            ID_SERIAL="Kbd /dev/zigbee",
            ID_PATH="a/" * 60 + "x",
        )
        udevd.send(serialize(hostile), worker=True)
        heard = inside.wait_for(
            lambda m: (
                m.is_libudev
                and m.env.get("DEVPATH") == kbd.devpath
                and m.env.get("ACTION") == "add"
                and m.env.get("DEVNAME") == f"/dev/disks/{kbd.name}"  # the kbd rule's
            ),
            timeout=10,
        )
        assert "DEVLINKS" in heard.env, (heard.env, daemon.log()[-6000:])
        links = heard.env["DEVLINKS"].split(" ")
        assert links == ["/dev/serial/by-id/Kbd_/dev/zigbee"]  # one entry, no /dev/zigbee
        assert heard.env["DEVNAME"] == f"/dev/disks/{kbd.name}"
        assert heard.env["ID_SERIAL"] == "Kbd /dev/zigbee"  # the property itself is data
        state = inside_state(
            box,
            [
                f"/dev/disks/{kbd.name}",
                "/dev/serial/by-id/Kbd_/dev/zigbee",
                "/dev/zigbee",
                "/dev/by-path",
                f"/dev/deep/{kbd.name}",
            ],
        )
        assert state == {
            f"/dev/disks/{kbd.name}": "ok",
            "/dev/serial/by-id/Kbd_/dev/zigbee": "symlink",
            "/dev/zigbee": "absent",
            "/dev/by-path": "absent",
            f"/dev/deep/{kbd.name}": "ok",  # the device goes in; only the deep link is left out
        }
        target = box.run(["readlink", "/dev/serial/by-id/Kbd_/dev/zigbee"]).stdout.decode()
        assert target.strip() == f"../../../../disks/{kbd.name}"
        # Nothing in the container's /dev deeper than the cap.
        deep = box.run(["find", "/dev", "-mindepth", "9"]).stdout.decode()
        assert deep == ""
        # The link that would have made the tree was left out for this event, said why.
        log = daemon.log()
        assert "is 62 levels below /dev; at most 8 are allowed" in log
        assert any("deep" in g["rule"] for g in daemon.grants())
        left_out = daemon.status()["left_out"]
        assert [entry["link"] for entry in left_out] == ["by-path/{ID_PATH}"], left_out
