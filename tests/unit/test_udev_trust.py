"""Who is believed on the udev group, device numbers against sysfs, and safe template values.

No root needed: udevd's identity is learned from a unix socket this test listens on
(its peer is then this very process), and sysfs is a fake tree in a temp dir laid out
like the real one (``dev/block/MAJ:MIN`` links into ``devices/``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrelay.core.config import DEFAULT_UDEV_CONTROL, load_config_text
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.plan import InjectUevent, MakeSymlink
from hotrelay.core.relay import Relay
from hotrelay.core.rules import RuleSet, RuleSetError
from hotrelay.core.rules.template import (
    MAX_DEV_DEPTH,
    Template,
    TemplateError,
    check_dev_template,
    confine_to_dev,
    sanitize_path_value,
)
from hotrelay.core.uevent import Uevent, Wire
from hotrelay.daemon import udevd as udevd_module
from hotrelay.daemon.source import UDEV_CONTROL
from hotrelay.daemon.udevd import UdevdIdentity, parent_pid
from hotrelay.sysfs import devnum_mismatch

# -- udevd's identity ----------------------------------------------------------------------


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Path]:
    """A listening SEQPACKET socket, like udevd's /run/udev/control; we are its peer."""
    path = tmp_path / "control"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(os.fspath(path))
        sock.listen(64)
        yield path


def known(identity: UdevdIdentity) -> int | None:
    """udevd's pid as the identity knows it now (a call, so that mypy does not narrow)."""
    return identity.pid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_udevd_is_the_peer_of_its_control_socket(control: Path) -> None:
    identity = UdevdIdentity(control)
    try:
        assert known(identity) == os.getpid()
        assert identity.problem is None
        assert identity.untrusted_because(os.getpid()) is None
    finally:
        identity.close()


def test_udevd_workers_are_its_children_and_nobody_else_is(control: Path) -> None:
    identity = UdevdIdentity(control)
    child = subprocess.Popen(["sleep", "30"])
    # A grandchild: what a udev rule's RUN program is (a worker's child).
    grandchild = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert grandchild.stdout is not None
        grand_pid = int(grandchild.stdout.readline())
        assert parent_pid(child.pid) == os.getpid()
        assert identity.untrusted_because(child.pid) is None
        assert identity.untrusted_because(child.pid) is None  # now from its pidfd
        reason = identity.untrusted_because(grand_pid)
        assert reason is not None
        assert f"sender pid {grand_pid} is not udevd (pid {os.getpid()})" in reason
        assert identity.untrusted_because(1) is not None
        assert identity.untrusted_because(None) == "no SCM_CREDENTIALS"
        # A worker that exited: its pidfd says so, and the pid is judged afresh.
        child.kill()
        child.wait()
        assert identity.untrusted_because(child.pid) is not None
    finally:
        for proc in (child, grandchild):
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-P", str(grandchild.pid)], check=False)
        if grandchild.stdout is not None:
            grandchild.stdout.close()
        identity.close()


def test_no_udevd_trusts_nobody_and_learns_it_later_at_a_bounded_rate(tmp_path: Path) -> None:
    path = tmp_path / "control"
    clock = Clock()
    identity = UdevdIdentity(path, clock=clock)
    try:
        assert known(identity) is None
        assert "udevd is not known" in (identity.untrusted_because(os.getpid()) or "")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.bind(os.fspath(path))
            sock.listen(8)
            # Within the relearn interval: not asked again (a flood costs no connects).
            assert identity.untrusted_because(os.getpid()) is not None
            clock.now += udevd_module.RELEARN_INTERVAL
            assert identity.untrusted_because(os.getpid()) is None
            assert known(identity) == os.getpid()
            assert identity.learned == 1
    finally:
        identity.close()


LISTENER = """
import os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.bind(sys.argv[1]); sock.listen(8)
print(os.getpid(), flush=True)
time.sleep(60)
"""


def test_a_restarted_udevd_is_learned_again(tmp_path: Path) -> None:
    path = tmp_path / "control"
    first = subprocess.Popen(
        [sys.executable, "-I", "-c", LISTENER, os.fspath(path)], stdout=subprocess.PIPE, text=True
    )
    second: subprocess.Popen[str] | None = None
    identity: UdevdIdentity | None = None
    try:
        assert first.stdout is not None
        first_pid = int(first.stdout.readline())
        identity = UdevdIdentity(path)
        assert known(identity) == first_pid
        first.kill()
        first.wait()
        identity.revalidate()
        assert known(identity) is None
        path.unlink()
        second = subprocess.Popen(
            [sys.executable, "-I", "-c", LISTENER, os.fspath(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert second.stdout is not None
        second_pid = int(second.stdout.readline())
        assert identity.untrusted_because(first_pid) is not None
        time.sleep(udevd_module.RELEARN_INTERVAL)
        assert identity.untrusted_because(second_pid) is None
        assert known(identity) == second_pid
    finally:
        if identity is not None:
            identity.close()
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()


def test_udev_control_is_configurable_and_defaults_to_udevds() -> None:
    assert str(UDEV_CONTROL) == DEFAULT_UDEV_CONTROL
    config = load_config_text('udev_control = "/tmp/x/control"\n', "/etc/hotrelay/hotrelay.toml")
    assert config.udev_control == "/tmp/x/control"
    with pytest.raises(RuleSetError, match="udev_control"):
        load_config_text('udev_control = "control"\n', "/etc/hotrelay/hotrelay.toml")


# -- device numbers against sysfs -------------------------------------------------------


def make_sysfs(root: Path) -> None:
    for kind, devpath, subsystem, number in [
        ("block", "devices/virtual/block/zram0", "block", "253:0"),
        ("block", "devices/pci0000:00/0000:00:01.1/ata1/host0/block/sda", "block", "8:0"),
        ("char", "devices/virtual/tty/ttyS0", "tty", "4:64"),
    ]:
        directory = root / devpath
        directory.mkdir(parents=True)
        (directory / "subsystem").symlink_to(f"../../../../class/{subsystem}")
        links = root / "dev" / kind
        links.mkdir(parents=True, exist_ok=True)
        (links / number).symlink_to(f"../../{devpath}")


def event(devpath: str, number: str, *, subsystem: str = "block", **more: str) -> Uevent:
    major, minor = number.split(":")
    props = {"ACTION": "add", "DEVPATH": devpath, "SUBSYSTEM": subsystem}
    props |= {"MAJOR": major, "MINOR": minor, **more}
    return Uevent.from_properties(props)


ZRAM0 = "/devices/virtual/block/zram0"


@pytest.mark.parametrize("wire", [Wire.KERNEL, Wire.UDEV])
def test_devnum_mismatch(tmp_path: Path, wire: Wire) -> None:
    root = tmp_path / "sys"
    make_sysfs(root)

    def check(uevent: Uevent) -> str | None:
        return devnum_mismatch(uevent.replace(wire=wire), os.fspath(root))

    assert check(event(ZRAM0, "253:0")) is None
    assert check(event("/devices/virtual/tty/ttyS0", "4:64", subsystem="tty")) is None
    # The attack: a harmless device's DEVPATH with the root disk's number.
    assert check(event(ZRAM0, "8:0")) == (
        f"block device 8:0 is /devices/pci0000:00/0000:00:01.1/ata1/host0/block/sda, not {ZRAM0}"
    )
    assert check(event(ZRAM0, "253:7")) == "block device 253:7 does not exist"
    # block vs char is the subsystem's say: a block number claimed for a tty.
    assert check(event("/devices/virtual/tty/ttyS0", "8:0", subsystem="tty")) == (
        "char device 8:0 does not exist"
    )
    # The right number and device, the wrong subsystem.
    assert check(event("/devices/virtual/tty/ttyS0", "4:64", subsystem="misc")) == (
        "/devices/virtual/tty/ttyS0 is of subsystem tty, not misc"
    )
    # A DEVPATH that only normalises to the device is not the device's DEVPATH.
    assert check(event("/devices/virtual/block/../block/zram0", "253:0")) is not None
    # Removes and events without a number have nothing to check.
    assert check(event(ZRAM0, "8:0", ACTION="remove")) is None
    assert (
        check(Uevent.from_properties({"ACTION": "add", "DEVPATH": ZRAM0, "SUBSYSTEM": "block"}))
        is None
    )


# -- template values in /dev paths --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("Kbd /dev/zigbee", "Kbd_/dev/zigbee"),
        ("  Logitech   USB\tReceiver \n", "Logitech_USB_Receiver"),
        ("a\x00b\x1bc\x7f", "a_b_c_"),
        ("x;rm -rf $HOME`id`", "x_rm_-rf__HOME_id_"),
        ("10c4:ea60#+-.=@_", "10c4:ea60#+-.=@_"),
        ("Ünïcødé", "Ünïcødé"),
        ("a\u00a0b\u2028c\u202ed", "a_b_c_d"),  # unicode spaces, separators, bidi controls
        ("Model\\x20Name\\n", "Model\\x20Name_n"),  # udev keeps \\x escapes only
        ("a/b/c", "a/b/c"),
        ("", ""),
    ],
)
def test_sanitize_path_value(value: str, safe: str) -> None:
    assert sanitize_path_value(value) == safe
    assert not any(c.isspace() for c in sanitize_path_value(value))


def test_sanitize_is_idempotent_and_keeps_only_safe_characters() -> None:
    every = "".join(chr(i) for i in range(0x3000))
    once = sanitize_path_value(every)
    assert sanitize_path_value(once) == once
    assert all(c.isalnum() or c in "#+-.:=@_/\\" or (ord(c) > 127) for c in once)
    assert all(c.isprintable() and not c.isspace() for c in once)


def test_expand_path_sanitizes_values_not_the_rules_own_text() -> None:
    uevent = event(ZRAM0, "253:0", ID_SERIAL="Kbd /dev/zigbee")
    template = Template.parse("serial/by-id/usb-{ID_SERIAL}")
    assert template.expand(uevent) == "serial/by-id/usb-Kbd /dev/zigbee"
    assert template.expand_path(uevent) == "serial/by-id/usb-Kbd_/dev/zigbee"
    assert confine_to_dev(template.expand_path(uevent)) == "/dev/serial/by-id/usb-Kbd_/dev/zigbee"


def test_depth_below_dev_is_capped() -> None:
    assert confine_to_dev("/".join(["d"] * MAX_DEV_DEPTH)) == "/dev/" + "/".join(["d"] * 8)
    with pytest.raises(TemplateError, match="9 levels below /dev; at most 8"):
        confine_to_dev("/dev/" + "/".join(["d"] * (MAX_DEV_DEPTH + 1)))
    with pytest.raises(TemplateError, match="contains whitespace"):
        confine_to_dev("/dev/a b")
    assert check_dev_template(Template.parse("a/b/c/d/e/f/g/h/i")) == (
        "is 9 levels below /dev; at most 8 are allowed"
    )
    assert check_dev_template(Template.parse("a/b/c/d/e/f/g/{ID_PATH}")) is None
    assert check_dev_template(Template.parse("my dongle")) == (
        "must not contain whitespace (DEVLINKS separates links with spaces)"
    )


RULES = """
[[rule]]
name = "kbd"
target = ["pid:4242"]
[rule.match]
kernel = "zram*"
[rule.device]
path = "/dev/disks/{kernel}"
symlinks = ["serial/by-id/{ID_SERIAL}"]
uevent = "udev"

[[rule]]
name = "deep"
target = ["pid:4242"]
[rule.match]
kernel = "zram*"
[rule.device]
path = "/dev/deep/{kernel}"
symlinks = ["by-path/{ID_PATH}"]
"""


def test_no_fake_devlinks_and_no_deep_tree_in_the_plan() -> None:
    rules = RuleSet.from_texts([("10-test.toml", RULES)])
    relay = Relay(rules)
    relay.container_started(ContainerRef(Runtime.PID, "4242", pid=4242, start_time=1))
    uevent = event(
        ZRAM0, "253:0", DEVNAME="/dev/zram0", ID_SERIAL="Kbd /dev/zigbee", ID_PATH="a/" * 40 + "x"
    ).replace(wire=Wire.UDEV)
    relay.device_event(uevent)
    by_rule = {b.rule: b for b in relay.desired.values()}
    kbd = by_rule["kbd"]
    links = [a.link for a in kbd.actions if isinstance(a, MakeSymlink)]
    assert links == ["/dev/serial/by-id/Kbd_/dev/zigbee"]
    (injected,) = [a.uevent for a in kbd.actions if isinstance(a, InjectUevent)]
    assert injected.get("DEVLINKS") == "/dev/serial/by-id/Kbd_/dev/zigbee"
    assert "/dev/zigbee" not in (injected.get("DEVLINKS") or "").split(" ")
    deep = by_rule["deep"]
    # The deep link is left out; the device (its node) still goes in.
    assert deep.skipped == ()
    (left,) = deep.left_out
    assert "42 levels below /dev; at most 8" in left.reason
    assert [b.rule for b in relay.take_skipped()] == ["deep"]
    assert relay.take_skipped() == []
    assert {job.key.rule for job in relay.next_jobs()} == {"kbd", "deep"}
