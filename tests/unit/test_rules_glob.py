"""Match values (globs, lists, negation) and templates with their /dev confinement."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotrelay.core.rules import GlobError, Pattern, Template, TemplateError, confine_to_dev
from hotrelay.core.rules.template import check_dev_template, check_ifname
from hotrelay.core.uevent import Uevent


@pytest.mark.parametrize(
    ("glob", "value", "expected"),
    [
        ("ttyUSB0", "ttyUSB0", True),
        ("ttyUSB0", "ttyUSB1", False),
        ("ttyUSB*", "ttyUSB12", True),
        ("ttyUSB*", "ttyACM0", False),
        ("tty?", "tty1", True),
        ("tty?", "tty12", False),
        ("tty[0-3]", "tty2", True),
        ("tty[0-3]", "tty4", False),
        ("tty[!0-3]", "tty4", True),
        ("tty[^0-3]", "tty1", False),
        ("[]]x", "]x", True),
        ("a[-z]", "a-", True),
        ("ttyUSB*|ttyACM*", "ttyACM3", True),
        ("ttyUSB*|ttyACM*", "ttyS0", False),
        ("a\\*", "a*", True),
        ("a\\*", "ab", False),
        ("a\\|b", "a|b", True),
        ("[|]", "|", True),
        ("*", "", True),
        ("", "", True),
        ("", "x", False),
        ("a.b", "axb", False),  # a regex dot is not a glob
        ("*", "line\nbreak", True),
    ],
)
def test_glob(glob: str, value: str, expected: bool) -> None:
    assert Pattern.parse(glob).matches(value) is expected


@pytest.mark.parametrize(
    ("value", "matches", "misses"),
    [
        (["ttyUSB*", "ttyACM*"], ["ttyUSB0", "ttyACM1"], ["ttyS0"]),
        ("!ttyS*", ["ttyUSB0", ""], ["ttyS0"]),
        (["!ttyS*", "!ttyAMA*"], ["ttyUSB0"], ["ttyS1", "ttyAMA0"]),
        (["ttyUSB*", "!ttyUSB9"], ["ttyUSB0"], ["ttyUSB9", "ttyS0"]),
        ("!a|b", ["c"], ["a", "b"]),
        ("\\!x", ["!x"], ["x"]),
    ],
)
def test_lists_and_negation(value: str | list[str], matches: list[str], misses: list[str]) -> None:
    pattern = Pattern.parse(value)
    for v in matches:
        assert pattern.matches(v), v
    for v in misses:
        assert not pattern.matches(v), v


def test_an_absent_value_fails_positive_globs_and_satisfies_pure_negation() -> None:
    assert not Pattern.parse("*").matches(None)
    assert Pattern.parse("!x").matches(None)
    assert not Pattern.parse(["a", "!x"]).matches(None)


def test_matches_any_for_tags() -> None:
    assert Pattern.parse("uaccess").matches_any({"seat", "uaccess"})
    assert not Pattern.parse("uaccess").matches_any(set())
    assert Pattern.parse("!systemd").matches_any({"seat"})
    assert Pattern.parse("!systemd").matches_any(set())
    assert not Pattern.parse("!systemd").matches_any({"seat", "systemd"})


def test_normalize_applies_to_each_alternative() -> None:
    pattern = Pattern.parse(["0x10C4|1A86", "!0xEA*"], str.lower)
    assert pattern.text == ("0x10C4|1A86", "!0xEA*")
    assert pattern.matches("0x10c4")
    assert pattern.matches("1a86")


def test_exact_values_are_indexable_and_globs_are_not() -> None:
    assert Pattern.parse(["tty", "hidraw|input"]).indexable == frozenset({"tty", "hidraw", "input"})
    assert Pattern.parse("a\\*").indexable == frozenset({"a*"})
    assert Pattern.parse(["tty", "usb*"]).indexable is None
    assert Pattern.parse(["tty", "!ttyS0"]).indexable is None
    assert Pattern.parse("!tty").indexable is None


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("tty[", "glob \"tty[\": unterminated '[' at position 4"),
        ("a[b", "glob \"a[b\": unterminated '[' at position 2"),
        ("x\\", "glob \"x\\\\\": trailing '\\' (escape what?)"),
        ("[z-a]", "glob \"[z-a]\": range 'z-a' is out of order"),
    ],
)
def test_bad_globs(glob: str, message: str) -> None:
    with pytest.raises(GlobError) as info:
        Pattern.parse(glob)
    assert str(info.value) == message


def test_an_empty_list_is_an_error() -> None:
    with pytest.raises(GlobError, match="empty list"):
        Pattern.parse([])


def test_str_shows_the_value_as_written() -> None:
    assert str(Pattern.parse("tty*")) == '"tty*"'
    assert str(Pattern.parse(["a", '!b"'])) == '["a", "!b\\""]'


_SIMPLE = st.text(alphabet="ab*?", max_size=6)


@given(glob=_SIMPLE, value=st.text(alphabet="ab", max_size=6))
def test_agrees_with_fnmatch_on_simple_globs(glob: str, value: str) -> None:
    assert Pattern.parse(glob).matches(value) is fnmatch.fnmatchcase(value, glob)


@given(st.text(max_size=20))
def test_any_glob_compiles_or_raises_glob_error(glob: str) -> None:
    try:
        pattern = Pattern.parse(glob)
    except GlobError:
        return
    pattern.matches(glob)


# Templates.

EVENT = Uevent.from_properties(
    {
        "ACTION": "add",
        "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0",
        "SUBSYSTEM": "tty",
        "DEVNAME": "/dev/ttyUSB0",
        "MAJOR": "188",
        "MINOR": "0",
        "ID_SERIAL": "Silicon_Labs_CP2102_0001",
        "EVIL": "../../etc",
        "SLASHED": "a/b",
    }
)


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("serial/by-id/{ID_SERIAL}", "serial/by-id/Silicon_Labs_CP2102_0001"),
        ("{kernel}", "ttyUSB0"),
        ("{devname}", "ttyUSB0"),
        ("{number}", "0"),
        ("{major}:{minor}", "188:0"),
        ("{subsystem}-{kernel}", "tty-ttyUSB0"),
        ("{{literal}}", "{literal}"),
        ("plain", "plain"),
    ],
)
def test_template_expansion(text: str, expanded: str) -> None:
    assert Template.parse(text).expand(EVENT) == expanded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{serial}", "unknown template name {serial}: properties are UPPERCASE such as "
         "{ID_SERIAL}; built-ins are {devname}, {kernel}, {major}, {minor}, {number}, "
         "{subsystem}"),
        ("{ID_SERIAL", "unterminated '{' at position 1 (write '{{' for a brace)"),
        ("a}", "unmatched '}' at position 2 (write '}}' for a brace)"),
        ("{}", "bad template name {} at position 1: expected a property such as {ID_SERIAL} "
         "or a built-in such as {kernel}"),
        ("{ID-X}", "bad template name {ID-X} at position 1: expected a property such as "
         "{ID_SERIAL} or a built-in such as {kernel}"),
    ],
)  # fmt: skip
def test_template_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse(text)
    assert str(info.value) == message


def test_a_missing_property_is_an_apply_time_error() -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse("by-id/{ID_MODEL}").expand(EVENT)
    assert str(info.value) == (
        '"by-id/{ID_MODEL}": the event for /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/'
        "ttyUSB0/tty/ttyUSB0 has no property ID_MODEL"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("/dev/zigbee", None),
        ("zigbee", None),
        ("serial/by-id/{ID_SERIAL}", None),
        ("{ID_SERIAL}", None),
        ("/etc/shadow", "must be under /dev (start it with /dev/, or make it relative to /dev)"),
        ("/{X}", "must be under /dev (start it with /dev/, or make it relative to /dev)"),
        ("/dev/../etc", "must not contain a '..' component"),
        ("a/./b", "must not contain a '.' component"),
        ("/dev/", "names no file under /dev"),
        ("a\nb", "must not contain control characters"),
    ],
)
def test_load_time_path_checks(text: str, problem: str | None) -> None:
    assert check_dev_template(Template.parse(text)) == problem


@pytest.mark.parametrize(
    ("path", "confined"),
    [
        ("zigbee", "/dev/zigbee"),
        ("/dev/zigbee", "/dev/zigbee"),
        ("serial//by-id/x", "/dev/serial/by-id/x"),
    ],
)
def test_confine_to_dev(path: str, confined: str) -> None:
    assert confine_to_dev(path) == confined


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", '"/etc/passwd" is outside /dev'),
        ("../../etc", "\"../../etc\" has a '..' component"),
        ("serial/../../x", "\"serial/../../x\" has a '..' component"),
        ("/dev/", '"/dev/" names no file under /dev'),
        ("", '"" names no file under /dev'),
        ("a\x00b", '"a\\u0000b" contains control characters'),
    ],
)
def test_confine_to_dev_refuses(path: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        confine_to_dev(path)
    assert str(info.value) == message


def test_a_property_value_cannot_escape_dev() -> None:
    expanded = Template.parse("serial/{EVIL}/x").expand(EVENT)
    with pytest.raises(TemplateError, match=r"'\.\.' component"):
        confine_to_dev(expanded)


@given(st.text(max_size=30))
def test_confined_paths_always_stay_in_dev(path: str) -> None:
    try:
        confined = confine_to_dev(path)
    except TemplateError:
        return
    assert confined.startswith("/dev/")
    assert ".." not in confined.split("/")
    assert "//" not in confined


@pytest.mark.parametrize(
    ("name", "partial", "problem"),
    [
        ("wan0", False, None),
        ("a" * 15, False, None),
        ("a" * 16, False, "is longer than 15 bytes, the limit for an interface name"),
        ("a b", False, 'must not contain " " (not allowed in interface names)'),
        ("a/b", False, 'must not contain "/" (not allowed in interface names)'),
        ("a:b", False, 'must not contain ":" (not allowed in interface names)'),
        ("..", False, "is not a valid interface name"),
        ("", True, None),
    ],
)
def test_interface_names(name: str, partial: bool, problem: str | None) -> None:
    assert check_ifname(name, partial=partial) == problem
