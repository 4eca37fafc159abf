"""The TOML loader: a valid file, and every error class with its exact ``path:line:`` text."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import Access
from hotrelay.core.rules import (
    Attrs,
    Env,
    EventField,
    RuleSet,
    RuleSetError,
    Target,
    TargetError,
    UeventMode,
    Usb,
    load_rules_text,
)
from hotrelay.core.rules.locate import Locator

VALID = """\
# A comment first.
[[rule]]
name = "zigbee-dongle"
description = "the Zigbee coordinator"
target = ["lxc:homeassistant", "docker:z2m-*"]

[rule.match]
subsystem = "tty"
kernel = ["ttyUSB*", "!ttyUSB9"]
usb = { vendor = "0x10C4", product = "ea60", serial = "0001" }
env.ID_BUS = "usb"
attrs = { bInterfaceNumber = "00" }

[rule.device]
path = "/dev/zigbee"
mode = "0660"
owner = 0
group = "dialout"
access = "rw"
symlinks = ["serial/by-id/{ID_SERIAL}", "/dev/ttyZB{number}"]
uevent = "both"

[[rule]]
name = "wan"
target = "lxc:router"
match.subsystem = "net"
match.usb.vendor = "0bda"
netdev.name = "wan0"
"""


def test_a_valid_file() -> None:
    zigbee, wan = load_rules_text(VALID, "/etc/hotrelay/rules.d/10.toml")
    assert zigbee.name == "zigbee-dongle"
    assert zigbee.description == "the Zigbee coordinator"
    assert [str(t) for t in zigbee.targets] == ["lxc:homeassistant", "docker:z2m-*"]
    assert str(zigbee.source) == "/etc/hotrelay/rules.d/10.toml:2"
    assert zigbee.source.name_line == 3
    # Conditions come out cheapest first, whatever the order in the file.
    assert [c.key for c in zigbee.conditions] == [
        "subsystem",
        "kernel",
        "env.ID_BUS",
        "usb",
        "attrs",
    ]
    assert isinstance(zigbee.conditions[0], EventField)
    assert isinstance(zigbee.conditions[2], Env)
    usb = zigbee.conditions[3]
    assert isinstance(usb, Usb)
    assert usb.vendor is not None
    assert usb.vendor.exact == {"10c4"}  # hex ids compare lowercase without 0x
    assert isinstance(zigbee.conditions[4], Attrs)
    device = zigbee.device
    assert device.path is not None
    assert device.path.text == "/dev/zigbee"
    assert device.mode == 0o660
    assert (device.owner, device.group) == (0, "dialout")
    assert device.access == Access(read=True, write=True, mknod=False)
    assert [s.text for s in device.symlinks] == ["serial/by-id/{ID_SERIAL}", "/dev/ttyZB{number}"]
    assert device.uevent is UeventMode.BOTH
    assert wan.netdev.name is not None
    assert wan.netdev.name.text == "wan0"
    assert wan.device.mode is None  # default: the host node's mode
    assert wan.device.access == Access()
    assert str(wan.source) == "/etc/hotrelay/rules.d/10.toml:23"


def test_numeric_owner_strings_become_numbers() -> None:
    (rule,) = load_rules_text(
        '[[rule]]\nname = "r"\ntarget = "pid:1"\nmatch.subsystem = "tty"\n'
        'device = { owner = "1000", group = 20 }\n',
        "f.toml",
    )
    assert (rule.device.owner, rule.device.group) == (1000, 20)


def test_an_empty_file_has_no_rules() -> None:
    assert load_rules_text("", "f.toml") == []
    assert load_rules_text("# nothing yet\n", "f.toml") == []


BASE = '[[rule]]\nname = "r"\ntarget = "lxc:c"\n[rule.match]\nsubsystem = "tty"\n'
R = 'f.toml:{}: rule "r": '


def errors(text: str, path: str = "f.toml") -> list[str]:
    with pytest.raises(RuleSetError) as info:
        load_rules_text(text, path)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TOML itself: tomllib's message, at its line.
        (BASE + "kernel = \n", "f.toml:6: invalid TOML: Invalid value (column 10)"),
        ('x = [1,\n', "f.toml:2: invalid TOML: Invalid value (at end of file)"),
        ('[[rule]]\nname = "a"\nname = "b"\n',
         "f.toml:3: invalid TOML: Cannot overwrite a value (column 11)"),
        # The file's shape.
        ('rules = []\n', 'f.toml:1: unknown top-level key "rules"; rules are [[rule]] tables'),
        ('[rule]\nname = "r"\n',
         "f.toml:1: [rule] is a single table: write [[rule]] (an array of tables), one per rule"),
        ('rule = "r"\n', 'f.toml:1: rule: expected [[rule]] tables, got string "r"'),
        ('rule = [1]\n', "f.toml:1: rule #1: expected a [[rule]] table, got integer 1"),
        # Required keys, unknown keys.
        ('[[rule]]\ntarget = "lxc:c"\nmatch.subsystem = "tty"\n',
         'f.toml:1: rule #1: missing name: every rule needs a unique name = "..."'),
        ('[[rule]]\nname = "r"\nmatch.subsystem = "tty"\n',
         'f.toml:1: rule "r": missing target: give target = ["RUNTIME:NAME", ...] such as '
         '"lxc:homeassistant"'),
        ('[[rule]]\nname = "r"\ntarget = "lxc:c"\n',
         'f.toml:1: rule "r": missing [rule.match]: a rule needs at least one condition'),
        (BASE + 'target = "lxc:d"\n',
         R.format(6) + 'match: unknown key "target" (target belongs to the rule itself: write it '
         "before [rule.match]); expected one of action, attr, attrs, devname, devtype, driver, "
         "env, kernel, pci, subsystem, tag, usb"),
        (BASE + 'kernal = "x"\n',
         R.format(6) + 'match: unknown key "kernal" (did you mean "kernel"?); expected one of '
         "action, attr, attrs, devname, devtype, driver, env, kernel, pci, subsystem, tag, usb"),
        ('[[rule]]\nname = "r"\ntargets = "lxc:c"\ntarget = "lxc:c"\nmatch.kernel = "x"\n',
         R.format(3) + 'unknown key "targets" (did you mean "target"?); expected one of '
         "description, device, match, name, netdev, target"),
        # name, description.
        ('[[rule]]\nname = 5\ntarget = "lxc:c"\nmatch.kernel = "x"\n',
         'f.toml:2: rule #1: name: expected a string such as "zigbee-dongle", got integer 5'),
        ('[[rule]]\nname = "a b"\ntarget = "lxc:c"\nmatch.kernel = "x"\n',
         'f.toml:2: rule #1: name: "a b" is not a rule name (1 to 128 letters, digits and '
         "_ . : @ + -)"),
        (BASE.replace('target', 'description = ["x"]\ntarget'),
         R.format(3) + "description: expected a string, got an array"),
        # Targets.
        (BASE.replace('"lxc:c"', "7"),
         R.format(3) + 'target: expected a "RUNTIME:NAME" string such as "lxc:homeassistant" '
         "or an array of them, got integer 7"),
        (BASE.replace('"lxc:c"', "[]"),
         R.format(3) + 'target: empty array; expected a "RUNTIME:NAME" string such as '
         '"lxc:homeassistant"'),
        (BASE.replace('"lxc:c"', '["lxc:c", 1]'),
         R.format(3) + 'target: expected a "RUNTIME:NAME" string such as "lxc:homeassistant" '
         "in the array, got integer 1"),
        (BASE.replace("lxc:c", "lcx:c"),
         R.format(3) + 'target: "lcx:c": unknown runtime "lcx"; expected one of cgroup, docker, '
         "incus, lxc, lxd, nspawn, pid, podman, runc"),
        (BASE.replace("lxc:c", "homeassistant"),
         R.format(3) + 'target: "homeassistant": expected RUNTIME:NAME, such as lxc:homeassistant'),
        (BASE.replace("lxc:c", "docker:"),
         R.format(3) + 'target: "docker:": empty name after "docker:"'),
        (BASE.replace("lxc:c", "pid:self"),
         R.format(3) + 'target: "pid:self": pid "self" is not a positive decimal number '
         '(expected PID or PID@STARTTIME)'),
        (BASE.replace("lxc:c", "cgroup:machine.slice"),
         R.format(3) + 'target: "cgroup:machine.slice": cgroup "machine.slice" is not an absolute '
         "cgroup path such as /machine.slice/machine-web.scope"),
        (BASE.replace("lxc:c", "cgroup:/a/../b"),
         R.format(3) + "target: \"cgroup:/a/../b\": cgroup \"/a/../b\" must not contain '.' or "
         "'..' components"),
        (BASE.replace("lxc:c", "lxc:a/b"),
         R.format(3) + 'target: "lxc:a/b": "a/b" is not a container name or name glob '
         "(letters, digits, '_', '.', '-' and glob characters)"),
        (BASE.replace("lxc:c", "lxc:web[1"),
         R.format(3) + "target: \"lxc:web[1\": glob \"web[1\": unterminated '[' at position 4"),
        # [rule.match].
        ('[[rule]]\nname = "r"\ntarget = "lxc:c"\nmatch = "tty"\n',
         R.format(4) + 'match: expected a table such as { subsystem = "tty" }, got string "tty"'),
        ('[[rule]]\nname = "r"\ntarget = "lxc:c"\n[rule.match]\n',
         R.format(4) + 'match: no conditions; a rule needs at least one (subsystem = "*" matches '
         "every device)"),
        (BASE + "kernel = 5\n",
         R.format(6) + "match.kernel: expected a glob string or an array of them, got integer 5"),
        (BASE + "kernel = [true]\n",
         R.format(6) + "match.kernel: expected a glob string in the array, got boolean true"),
        (BASE + "kernel = []\n", R.format(6) + "match.kernel: empty array; expected a glob string"),
        (BASE + 'kernel = "tty[USB"\n',
         R.format(6) + "match.kernel: glob \"tty[USB\": unterminated '[' at position 4"),
        (BASE + 'devname = ["ok", "bad\\\\"]\n',
         R.format(6) + "match.devname: glob \"bad\\\\\": trailing '\\' (escape what?)"),
        (BASE + 'env = "x"\n',
         R.format(6) + 'match.env: expected a table such as { NAME = "glob" }, got string "x"'),
        (BASE + "attrs = {}\n",
         R.format(6) + "match.attrs: empty table; give at least one NAME = glob"),
        (BASE + 'attr."../x" = "1"\n',
         R.format(6) + "match.attr: \"../x\" is not an attribute name (a file in the device's "
         "sysfs directory, no '/')"),
        (BASE + 'env."A=B" = "1"\n',
         R.format(6) + "match.env: \"A=B\" is not a property name (no '=' or NUL)"),
        (BASE + "env.X = 1.5\n",
         R.format(6) + "match.env.X: expected a glob string or an array of them, got float 1.5"),
        (BASE + 'usb = "10c4"\n',
         R.format(6) + 'match.usb: expected a table such as { vendor = "10c4", product = "ea60" }, '
         'got string "10c4"'),
        (BASE + "usb = {}\n", R.format(6) + "match.usb: empty table; give vendor, product, serial"),
        (BASE + 'usb = { vendor = "10c4", id = "1" }\n',
         R.format(6) + 'match.usb: unknown key "id"; expected one of product, serial, vendor'),
        (BASE + 'usb.vendor = "silabs"\n',
         R.format(6) + 'match.usb.vendor: "silabs" is not a 4-digit hex id such as "10c4" '
         "(globs and arrays are fine)"),
        (BASE + 'usb.product = ["ea60", "!ea6"]\n',
         R.format(6) + 'match.usb.product: "!ea6" is not a 4-digit hex id such as "10c4" '
         "(globs and arrays are fine)"),
        (BASE + 'pci = { vendor = "10de", devise = "1" }\n',
         R.format(6) + 'match.pci: unknown key "devise" (did you mean "device"?); expected one '
         "of device, slot, vendor"),
        (BASE + "pci = 3\n",
         R.format(6) + 'match.pci: expected a table such as { vendor = "10de", device = "2204" }, '
         "got integer 3"),
        # [rule.device].
        (BASE + "device = 1\n",
         R.format(6) + 'match: unknown key "device" (device belongs to the rule itself: write it '
         "before [rule.match]); expected one of action, attr, attrs, devname, devtype, driver, "
         "env, kernel, pci, subsystem, tag, usb"),
        (BASE + "[rule.device]\nmodes = \"0660\"\n",
         R.format(7) + 'device: unknown key "modes" (did you mean "mode"?); expected one of '
         "access, group, mode, owner, path, symlinks, uevent"),
        (BASE.replace("[rule.match]", 'device = "x"\n[rule.match]'),
         R.format(4) + 'device: expected a table such as { path = "/dev/zigbee" }, got string "x"'),
        (BASE + "[rule.device]\npath = 5\n",
         R.format(7) + "device.path: expected a string, got integer 5"),
        (BASE + '[rule.device]\npath = "/etc/shadow"\n',
         R.format(7) + 'device.path: "/etc/shadow" must be under /dev (start it with /dev/, or '
         "make it relative to /dev)"),
        (BASE + '[rule.device]\npath = "/dev/../etc/shadow"\n',
         R.format(7) + "device.path: \"/dev/../etc/shadow\" must not contain a '..' component"),
        (BASE + '[rule.device]\npath = "/dev/{serial}"\n',
         R.format(7) + 'device.path: "/dev/{serial}": unknown template name {serial}: properties '
         "are UPPERCASE such as {ID_SERIAL}; built-ins are {devname}, {kernel}, {major}, "
         "{minor}, {number}, {subsystem}"),
        (BASE + '[rule.device]\npath = "/dev/{ID_SERIAL"\n',
         R.format(7) + "device.path: \"/dev/{ID_SERIAL\": unterminated '{' at position 6 (write "
         "'{{' for a brace)"),
        (BASE + "[rule.device]\nmode = 660\n",
         R.format(7) + 'device.mode: expected an octal string such as "0660", got integer 660 '
         "(TOML integers lose their base: quote it)"),
        (BASE + '[rule.device]\nmode = "rw-rw----"\n',
         R.format(7) + 'device.mode: "rw-rw----" is not an octal mode such as "0660"'),
        (BASE + '[rule.device]\nmode = "4755"\n',
         R.format(7) + 'device.mode: "4755" sets setuid, setgid or sticky bits; a device node '
         "takes permission bits only (at most 0777)"),
        (BASE + '[rule.device]\nowner = "Bad Name"\n',
         R.format(7) + 'device.owner: "Bad Name" is not a user name or number'),
        (BASE + "[rule.device]\ngroup = -1\n",
         R.format(7) + "device.group: -1 is not a valid id (0 to 4294967294)"),
        (BASE + "[rule.device]\ngroup = true\n",
         R.format(7) + "device.group: expected a group name or number, got boolean true"),
        (BASE + '[rule.device]\naccess = "rx"\n',
         R.format(7) + 'device.access: "rx" is not a subset of "rwm" (such as "rw")'),
        (BASE + '[rule.device]\nsymlinks = ["ok", "../../etc/x"]\n',
         R.format(7) + "device.symlinks: \"../../etc/x\" must not contain a '..' component"),
        (BASE + '[rule.device]\nsymlinks = "/var/x"\n',
         R.format(7) + 'device.symlinks: "/var/x" must be under /dev (start it with /dev/, or '
         "make it relative to /dev)"),
        (BASE + '[rule.device]\nuevent = "yes"\n',
         R.format(7) + 'device.uevent: expected one of auto, kernel, udev, both, none, got "yes"'),
        # [rule.netdev].
        (BASE + '[rule.netdev]\nname = "wan 0"\n',
         R.format(7) + 'netdev.name: "wan 0" must not contain " " (not allowed in interface '
         "names)"),
        (BASE + '[rule.netdev]\nname = "a-very-long-name0"\n',
         R.format(7) + 'netdev.name: "a-very-long-name0" is longer than 15 bytes, the limit for '
         "an interface name"),
        (BASE + '[rule.netdev]\nnam = "wan0"\n',
         R.format(7) + 'netdev: unknown key "nam" (did you mean "name"?); expected one of name'),
        (BASE + "[rule.device]\nnetdev = []\n",
         R.format(7) + 'device: unknown key "netdev" (netdev belongs to the rule itself: write it '
         "before [rule.device]); expected one of access, group, mode, owner, path, symlinks, "
         "uevent"),
        # Names are unique.
        (BASE + BASE,
         'f.toml:7: rule "r": duplicate name; first defined at f.toml:1'),
    ],
)  # fmt: skip
def test_each_error_names_its_line_key_and_expectation(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_every_problem_of_a_file_is_reported_in_line_order() -> None:
    text = (
        '[[rule]]\nname = "a"\ntarget = "lcx:c"\n[rule.match]\nkernel = 1\n'
        '[rule.device]\nmode = "9"\n'
        '[[rule]]\nname = "b"\ntarget = "lxc:c"\nmatch.usb.vendor = "x"\n'
        "oops = 1\n"
    )
    assert errors(text) == [
        'f.toml:3: rule "a": target: "lcx:c": unknown runtime "lcx"; expected one of cgroup, '
        "docker, incus, lxc, lxd, nspawn, pid, podman, runc",
        'f.toml:5: rule "a": match.kernel: expected a glob string or an array of them, got '
        "integer 1",
        'f.toml:7: rule "a": device.mode: "9" is not an octal mode such as "0660"',
        'f.toml:11: rule "b": match.usb.vendor: "x" is not a 4-digit hex id such as "10c4" '
        "(globs and arrays are fine)",
        'f.toml:12: rule "b": unknown key "oops"; expected one of description, device, match, '
        "name, netdev, target",
    ]


def test_names_are_unique_across_files() -> None:
    with pytest.raises(RuleSetError) as info:
        RuleSet.from_texts([("a.toml", BASE), ("b.toml", "\n\n" + BASE)])
    assert [str(e) for e in info.value.errors] == [
        'b.toml:4: rule "r": duplicate name; first defined at a.toml:1'
    ]


def test_duplicates_are_found_among_broken_rules_too() -> None:
    broken = BASE.replace('"lxc:c"', '"lcx:c"')
    assert errors(BASE + broken) == [
        'f.toml:7: rule "r": duplicate name; first defined at f.toml:1',
        'f.toml:8: rule "r": target: "lcx:c": unknown runtime "lcx"; expected one of cgroup, '
        "docker, incus, lxc, lxd, nspawn, pid, podman, runc",
    ]
    with pytest.raises(RuleSetError) as info:
        RuleSet.from_texts([("a.toml", broken), ("b.toml", BASE)])
    assert [str(e) for e in info.value.errors] == [
        'a.toml:3: rule "r": target: "lcx:c": unknown runtime "lcx"; expected one of cgroup, '
        "docker, incus, lxc, lxd, nspawn, pid, podman, runc",
        'b.toml:2: rule "r": duplicate name; first defined at a.toml:1',
    ]


def test_a_rule_set_reports_the_errors_of_every_file() -> None:
    with pytest.raises(RuleSetError) as info:
        RuleSet.from_texts([("a.toml", "x ="), ("b.toml", BASE), ("c.toml", "rules = 1")])
    assert str(info.value) == (
        "a.toml:1: invalid TOML: Invalid value (at end of file)\n"
        'c.toml:1: unknown top-level key "rules"; rules are [[rule]] tables'
    )


def test_targets() -> None:
    assert Target.parse("lxc:web-*").glob.matches("web-1")
    assert str(Target.parse("cgroup:/machine.slice/*")) == "cgroup:/machine.slice/*"
    ref = ContainerRef(Runtime.DOCKER, "frigate", 42, id="0123abcd")
    assert Target.parse("docker:frig*").selects(ref)
    assert Target.parse("docker:0123abcd").selects(ref)
    assert not Target.parse("podman:frigate").selects(ref)
    assert Target.parse("pid:42").selects(ContainerRef(Runtime.PID, "42", 42))
    assert Target.parse("cgroup:/lxc.payload.*").selects(
        ContainerRef(Runtime.CGROUP, "x", 7, unified_cgroup="/lxc.payload.web")
    )
    with pytest.raises(TargetError):
        Target.parse("pid:0")


def test_every_bad_target_of_a_list_is_reported_at_once() -> None:
    text = '[[rule]]\nname = "r"\ntarget = ["lxc:a", "nope", "docker:", "pid:x"]\n'
    text += 'match.kernel = "*"\n'
    assert errors(text) == [
        'f.toml:3: rule "r": target: "nope": expected RUNTIME:NAME, such as lxc:homeassistant',
        'f.toml:3: rule "r": target: "docker:": empty name after "docker:"',
        'f.toml:3: rule "r": target: "pid:x": pid "x" is not a positive decimal number '
        "(expected PID or PID@STARTTIME)",
    ]


# The locator.


def test_locator_finds_headers_keys_and_dotted_keys() -> None:
    text = (
        'top = "x"\n'  # 1
        "[[rule]]\n"  # 2
        'name = "a"\n'  # 3
        "target = [\n"  # 4
        '  "lxc:a",   # name = "fake" [[rule]]\n'  # 5
        "  \"lxc:'b'\",\n"  # 6
        "]\n"  # 7
        "[rule.match]\n"  # 8
        'env."ID.X" = "1"\n'  # 9
        "usb = { vendor = \"1\", product = '2' }\n"  # 10
        'description = """\n'  # 11
        "[[rule]]\n"  # 12: inside a string
        'kernel = "x"\n'  # 13: inside a string
        '"""\n'  # 14
        "  [ rule . device ]  # spaced\r\n"  # 15
        "'mode' = '0600'\n"  # 16
        "[[rule]]\n"  # 17
        "match.kernel = 'k'\n"  # 18
    )
    locator = Locator(text)
    assert locator.rule_lines == [2, 17]
    assert locator.line_of(None, ("top",)) == 1
    assert locator.line_of(0, ("name",)) == 3
    assert locator.line_of(0, ("target",)) == 4
    assert locator.line_of(0, ("match",)) == 8
    assert locator.line_of(0, ("match", "env", "ID.X")) == 9
    assert locator.line_of(0, ("match", "usb", "product")) == 10  # inside the inline table
    assert locator.line_of(0, ("match", "kernel")) == 8  # unknown: falls back to [rule.match]
    assert locator.line_of(0, ("device", "mode")) == 16
    assert locator.line_of(1, ("match", "kernel")) == 18
    assert locator.line_of(1, ("device",)) == 17  # falls back to the rule's header
    assert locator.line_of(5, ("name",)) == 1


def test_locator_survives_literal_and_escaped_strings() -> None:
    text = (
        "[[rule]]\n"
        "a = '''\n"
        "[[rule]]'''\n"
        'b = "say \\"[[rule]]\\""\n'
        'c = """x \\""" still in"""\n'
        "d = 1\n"
    )
    locator = Locator(text)
    assert locator.rule_lines == [1]
    assert locator.line_of(0, ("b",)) == 4
    assert locator.line_of(0, ("d",)) == 6


# Fuzzing: any text, and documents built from the language's own keys, either load or
# raise RuleSetError whose errors each name a line of the file.


def _check_no_crash(text: str) -> None:
    lines = text.count("\n") + 1
    try:
        rules = load_rules_text(text, "fuzz.toml")
    except RuleSetError as exc:
        for error in exc.errors:
            assert error.path == "fuzz.toml"
            assert error.line is not None
            assert 1 <= error.line <= lines, (error, text)
            assert str(error).startswith(f"fuzz.toml:{error.line}: ")
        return
    assert all(rule.source.path == "fuzz.toml" for rule in rules)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_any_text(text: str) -> None:
    _check_no_crash(text)


_KEYS = [
    "name", "description", "target", "match", "device", "netdev", "action", "subsystem",
    "devtype", "kernel", "devname", "driver", "env", "attr", "attrs", "tag", "usb", "pci",
    "vendor", "product", "serial", "device", "slot", "path", "mode", "owner", "group",
    "access", "symlinks", "uevent", "ID_SERIAL", "idVendor", "x",
]  # fmt: skip
_STRINGS = [
    "lxc:c", "docker:a*", "pid:1", "cgroup:/a", "bad", "tty", "ttyUSB*", "!x", "[", "10c4",
    "0x10DE", "0660", "rw", "rx", "auto", "/dev/x", "/etc/x", "{ID_SERIAL}", "{bad}", "..",
    "", "a\\", "wan0", "dialout",
]  # fmt: skip

_scalar = (
    st.sampled_from(_STRINGS)
    | st.text(max_size=8)
    | st.integers(-5, 5000)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
)
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"


def _render(rules: list[dict[str, Any]], style: int) -> str:
    out = []
    for rule in rules:
        out.append("[[rule]]")
        tables = []
        for key, value in rule.items():
            if isinstance(value, dict) and style % 2:
                tables.append((key, value))  # as a [rule.KEY] section
            else:
                out.append(f"{key} = {_toml_value(value)}")
        for key, value in tables:
            out.append(f"[rule.{key}]")
            out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        if style % 3 == 0:
            out.append("# a comment")
    return "\n".join(out) + "\n"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.dictionaries(st.sampled_from(_KEYS), _value, max_size=6), max_size=3),
    st.integers(0, 5),
)
def test_fuzz_documents_of_rule_keys(rules: list[dict[str, Any]], style: int) -> None:
    _check_no_crash(_render(rules, style))


_match = st.fixed_dictionaries(
    {},
    optional={
        "subsystem": st.sampled_from(["tty", "block", ["tty", "hidraw"], "!net"]),
        "kernel": st.sampled_from(["ttyUSB*", ["a", "!b"]]),
        "usb": st.fixed_dictionaries({"vendor": st.sampled_from(["10c4", "0x1A86", "10c*"])}),
        "env": st.fixed_dictionaries({"ID_SERIAL": st.sampled_from(["x", "!y*"])}),
    },
).filter(bool)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"target": st.sampled_from(["lxc:a", ["docker:b*", "pid:3"]]), "match": _match}
        ),
        max_size=4,
    ),
    st.integers(0, 5),
)
def test_fuzz_valid_documents_load(rules: list[dict[str, Any]], style: int) -> None:
    named = [{"name": f"rule-{i}", **rule} for i, rule in enumerate(rules)]
    loaded = load_rules_text(_render(named, style), "ok.toml")
    assert [r.name for r in loaded] == [r["name"] for r in named]
