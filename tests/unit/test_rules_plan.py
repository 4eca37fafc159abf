"""The planner: grant -> node -> symlinks -> uevent for add, the reverse for remove."""

from __future__ import annotations

import json

import pytest

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import Access, DeviceRule, DeviceType
from hotrelay.core.plan import (
    GrantDevice,
    InjectUevent,
    MakeNode,
    MoveNetdev,
    SkipRule,
    SkipSymlink,
    _relative_link,
    action_to_dict,
    plan_for,
)
from hotrelay.core.rules import Rule, RuleSet, Target
from hotrelay.core.uevent import Uevent, Wire

TTY = Uevent.from_properties(
    {
        "ACTION": "add",
        "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0",
        "SUBSYSTEM": "tty",
        "DEVNAME": "/dev/ttyUSB0",
        "MAJOR": "188",
        "MINOR": "0",
        "ID_SERIAL": "Silicon_Labs_CP2102_0001",
        "SEQNUM": "7",
    },
    Wire.UDEV,
)
NIC = Uevent.from_properties(
    {
        "ACTION": "add",
        "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/net/enx001122334455",
        "SUBSYSTEM": "net",
        "INTERFACE": "enx001122334455",
        "IFINDEX": "7",
    }
)
ZRAM = Uevent.from_properties(
    {
        "ACTION": "add",
        "DEVPATH": "/devices/virtual/block/zram1",
        "SUBSYSTEM": "block",
        "DEVTYPE": "disk",
        "DEVNAME": "zram1",
        "MAJOR": "252",
        "MINOR": "1",
    }
)

ZIGBEE = """
[[rule]]
name = "zigbee"
target = ["lxc:ha", "docker:z2m"]
match.subsystem = "tty"
[rule.device]
path = "/dev/zigbee"
mode = "0660"
group = "dialout"
access = "rw"
symlinks = ["serial/by-id/usb-{ID_SERIAL}", "ttyZB{number}"]
"""


def rules(text: str) -> list[Rule]:
    return list(RuleSet.from_texts([("t.toml", text)]).rules)


def described(event: Uevent, matched: list[Rule]) -> list[str]:
    return [action.describe() for action in plan_for(event, matched)]


def test_add_grants_then_creates_then_links_then_injects() -> None:
    assert described(TTY, rules(ZIGBEE)) == [
        "grant c 188:0 rw to lxc:ha",
        "create /dev/zigbee (c 188:0, mode 0660, owner 0, group dialout) in lxc:ha",
        "symlink /dev/serial/by-id/usb-Silicon_Labs_CP2102_0001 -> ../../zigbee in lxc:ha",
        "symlink /dev/ttyZB0 -> zigbee in lxc:ha",
        "inject add uevent for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/"
        "ttyUSB0 (auto wire) into lxc:ha",
        "grant c 188:0 rw to docker:z2m",
        "create /dev/zigbee (c 188:0, mode 0660, owner 0, group dialout) in docker:z2m",
        "symlink /dev/serial/by-id/usb-Silicon_Labs_CP2102_0001 -> ../../zigbee in docker:z2m",
        "symlink /dev/ttyZB0 -> zigbee in docker:z2m",
        "inject add uevent for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/"
        "ttyUSB0 (auto wire) into docker:z2m",
    ]


def test_remove_is_the_exact_reverse() -> None:
    remove = TTY.replace(ACTION="remove")
    assert described(remove, rules(ZIGBEE)) == [
        "inject remove uevent for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/"
        "ttyUSB0 (auto wire) into docker:z2m",
        "remove symlink /dev/ttyZB0 (if -> zigbee) in docker:z2m",
        "remove symlink /dev/serial/by-id/usb-Silicon_Labs_CP2102_0001 (if -> ../../zigbee) in "
        "docker:z2m",
        "remove /dev/zigbee (if still c 188:0) in docker:z2m",
        "revoke c 188:0 rw from docker:z2m",
        "inject remove uevent for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/"
        "ttyUSB0 (auto wire) into lxc:ha",
        "remove symlink /dev/ttyZB0 (if -> zigbee) in lxc:ha",
        "remove symlink /dev/serial/by-id/usb-Silicon_Labs_CP2102_0001 (if -> ../../zigbee) in "
        "lxc:ha",
        "remove /dev/zigbee (if still c 188:0) in lxc:ha",
        "revoke c 188:0 rw from lxc:ha",
    ]


def test_other_actions_only_replay_the_uevent() -> None:
    change = TTY.replace(ACTION="change")
    assert [type(a) for a in plan_for(change, rules(ZIGBEE))] == [InjectUevent, InjectUevent]


def test_defaults_keep_the_host_path_and_mode() -> None:
    (rule,) = rules('[[rule]]\nname = "z"\ntarget = "pid:42"\nmatch.subsystem = "block"\n')
    assert described(ZRAM, [rule]) == [
        "grant b 252:1 rwm to pid:42",
        "create /dev/zram1 (b 252:1, mode as on the host, owner 0, group 0) in pid:42",
        "inject add uevent for /devices/virtual/block/zram1 (auto wire) into pid:42",
    ]
    grant, node, _ = plan_for(ZRAM, [rule])
    assert grant == GrantDevice(
        Target.parse("pid:42"), DeviceRule(DeviceType.BLOCK, 252, 1, Access()), "z"
    )
    assert isinstance(node, MakeNode)
    assert (node.path, node.type, node.mode) == ("/dev/zram1", DeviceType.BLOCK, None)


@pytest.mark.parametrize(
    ("mode", "wires"),
    [
        ("auto", [None]),
        ("kernel", [Wire.KERNEL]),
        ("udev", [Wire.UDEV]),
        ("both", [Wire.KERNEL, Wire.UDEV]),
        ("none", []),
    ],
)
def test_uevent_modes(mode: str, wires: list[Wire | None]) -> None:
    (rule,) = rules(
        f'[[rule]]\nname = "z"\ntarget = "lxc:a"\nmatch.subsystem = "block"\n'
        f'device.uevent = "{mode}"\n'
    )
    for event in (ZRAM, ZRAM.replace(ACTION="remove"), ZRAM.replace(ACTION="change")):
        injected = [a.wire for a in plan_for(event, [rule]) if isinstance(a, InjectUevent)]
        assert injected == wires


def test_a_net_interface_is_moved_and_renamed() -> None:
    (rule,) = rules(
        '[[rule]]\nname = "wan"\ntarget = "lxc:router"\nmatch.subsystem = "net"\n'
        'netdev.name = "wan{IFINDEX}"\n'
    )
    assert plan_for(NIC, [rule]) == [
        MoveNetdev(Target.parse("lxc:router"), "enx001122334455", "wan7", "wan")
    ]
    assert described(NIC, [rule]) == ["move interface enx001122334455 into lxc:router as wan7"]
    # Gone from the host by then: the kernel tells the container about its removal.
    assert plan_for(NIC.replace(ACTION="remove"), [rule]) == []
    assert plan_for(NIC.replace(ACTION="change"), [rule]) == []
    (keep,) = rules('[[rule]]\nname = "k"\ntarget = "lxc:r"\nmatch.subsystem = "net"\n')
    assert described(NIC, [keep]) == ["move interface enx001122334455 into lxc:r"]


def test_events_without_a_node_plan_nothing() -> None:
    (rule,) = rules('[[rule]]\nname = "any"\ntarget = "lxc:a"\nmatch.subsystem = "*"\n')
    interface = Uevent.from_properties(
        {
            "ACTION": "add",
            "DEVPATH": "/devices/x/1-3:1.0",
            "SUBSYSTEM": "usb",
            "DEVTYPE": "usb_interface",
        }
    )
    assert plan_for(interface, [rule]) == []
    assert plan_for(interface.replace(ACTION="bind"), [rule]) == []


@pytest.mark.parametrize(
    ("device", "event", "reason"),
    [
        ('path = "by-id/{ID_MODEL}"', TTY,
         '"by-id/{ID_MODEL}": the event for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/'
         "ttyUSB0/tty/ttyUSB0 has no property ID_MODEL"),
        ('path = "{EVIL}"', TTY.replace(EVIL="../etc/shadow"),
         "\"../etc/shadow\" has a '..' component"),
        ('symlinks = ["{DEVNAME}"]', TTY,
         "symlink /dev/ttyUSB0 would replace the device node itself"),
        ("uevent = 'none'", ZRAM.replace(DEVNAME=None),
         "/devices/virtual/block/zram1 has no DEVNAME and the rule sets no device.path"),
    ],
)  # fmt: skip
def test_a_rule_that_cannot_apply_is_skipped_with_the_reason(
    device: str, event: Uevent, reason: str
) -> None:
    (rule,) = rules(
        f'[[rule]]\nname = "r"\ntarget = "lxc:a"\nmatch.kernel = "*"\ndevice = {{ {device} }}\n'
    )
    for action in (event, event.replace(ACTION="remove")):
        assert plan_for(action, [rule]) == [SkipRule("r", reason)]
    assert described(event, [rule]) == [f"skip rule r for every target: {reason}"]


def test_a_link_without_a_value_is_left_out_and_the_device_still_goes_in() -> None:
    (rule,) = rules(
        '[[rule]]\nname = "r"\ntarget = "lxc:a"\nmatch.kernel = "*"\n'
        'device.symlinks = ["by-id/{ID_MODEL}", "by-serial/{ID_SERIAL}"]\n'
    )
    plan = plan_for(TTY, [rule])
    assert [type(a).__name__ for a in plan] == [
        "GrantDevice", "MakeNode", "MakeSymlink", "SkipSymlink", "InjectUevent",
    ]  # fmt: skip
    left = plan[3]
    assert isinstance(left, SkipSymlink)
    assert left.link == "by-id/{ID_MODEL}"
    assert left.reason.endswith("has no property ID_MODEL")
    assert left.describe().startswith('skip symlink in lxc:a: "by-id/{ID_MODEL}": the event')
    removal = [a.describe() for a in plan_for(TTY.replace(ACTION="remove"), [rule])]
    assert not any("skip" in line for line in removal)
    assert any("/dev/by-serial/Silicon_Labs_CP2102_0001" in line for line in removal)


def test_an_expanded_interface_name_is_checked() -> None:
    (rule,) = rules(
        '[[rule]]\nname = "r"\ntarget = "lxc:a"\nmatch.subsystem = "net"\n'
        'netdev.name = "{INTERFACE}-wan"\n'
    )
    assert described(NIC, [rule]) == [
        'skip rule r for every target: interface name "enx001122334455-wan" is longer than 15 '
        "bytes, the limit for an interface name"
    ]


def test_a_skipped_rule_does_not_stop_the_others() -> None:
    bad, good = rules(
        '[[rule]]\nname = "bad"\ntarget = "lxc:a"\nmatch.kernel = "*"\ndevice.path = "{NOPE}"\n'
        '[[rule]]\nname = "good"\ntarget = "lxc:b"\nmatch.kernel = "*"\n'
    )
    plan = plan_for(ZRAM, [bad, good])
    assert isinstance(plan[0], SkipRule)
    assert [a.origin for a in plan] == ["bad", "good", "good", "good"]


def test_resolved_containers_replace_target_patterns() -> None:
    (rule,) = rules('[[rule]]\nname = "z"\ntarget = "lxc:web-*"\nmatch.subsystem = "block"\n')
    web1 = ContainerRef(Runtime.LXC, "web-1", 100)
    web2 = ContainerRef(Runtime.LXC, "web-2", 200)
    plan = plan_for(ZRAM, [rule], resolve=lambda target: [web1, web2])
    assert [a.describe() for a in plan if isinstance(a, GrantDevice)] == [
        "grant b 252:1 rwm to lxc:web-1",
        "grant b 252:1 rwm to lxc:web-2",
    ]
    assert plan_for(ZRAM, [rule], resolve=lambda target: []) == []


def test_actions_render_as_json() -> None:
    plan = plan_for(TTY, rules(ZIGBEE))
    rendered = json.loads(json.dumps([action_to_dict(a) for a in plan]))
    assert rendered[0] == {
        "action": "GrantDevice",
        "describe": "grant c 188:0 rw to lxc:ha",
        "container": "lxc:ha",
        "device": "c 188:0 rw",
        "origin": "zigbee",
    }
    assert rendered[1]["type"] == "c"
    assert rendered[1]["mode"] == 0o660
    assert rendered[4]["uevent"] == {"action": "add", "devpath": TTY.devpath, "seqnum": 7}
    assert rendered[4]["wire"] is None


@pytest.mark.parametrize(
    ("link", "target", "relative"),
    [
        ("/dev/serial/by-id/x", "/dev/ttyUSB0", "../../ttyUSB0"),
        ("/dev/x", "/dev/ttyUSB0", "ttyUSB0"),
        ("/dev/dri/by-path/x", "/dev/dri/renderD128", "../renderD128"),
        ("/dev/a", "/dev/bus/usb/001/002", "bus/usb/001/002"),
    ],
)
def test_symlinks_are_relative_like_udevs(link: str, target: str, relative: str) -> None:
    assert _relative_link(link, target) == relative


def test_a_change_is_replayed_even_when_the_rule_cannot_place_the_node() -> None:
    (rule,) = rules(
        '[[rule]]\nname = "r"\ntarget = ["lxc:a", "lxc:b"]\nmatch.kernel = "*"\n'
        'device.path = "{NOPE}"\n'
    )
    change = ZRAM.replace(ACTION="change")
    assert described(change, [rule]) == [
        "inject change uevent for /devices/virtual/block/zram1 (auto wire) into lxc:a",
        "inject change uevent for /devices/virtual/block/zram1 (auto wire) into lxc:b",
    ]
