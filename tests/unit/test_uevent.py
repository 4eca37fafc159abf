"""Uevent wire formats: golden captures from this kernel and udevd, round trips, errors."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hotrelay.core.uevent import (
    LIBUDEV_HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Uevent,
    UeventParseError,
    Wire,
    murmurhash2,
    parse,
    parse_kernel,
    parse_libudev,
    serialize,
    tag_bloom,
)

GOLDEN = Path(__file__).parent.parent / "data" / "uevents"
EXPECTED: dict[str, dict[str, Any]] = json.loads((GOLDEN / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_capture_parses_to_recorded_event(name: str) -> None:
    uevent = parse((GOLDEN / name).read_bytes())
    want = EXPECTED[name]
    assert uevent.wire.value == want["wire"]
    assert uevent.action == want["action"]
    assert uevent.devpath == want["devpath"]
    assert uevent.subsystem == want["subsystem"]
    assert uevent.devtype == want["devtype"]
    assert uevent.devname == want["devname"]
    assert (uevent.major, uevent.minor) == (want["major"], want["minor"])
    assert uevent.seqnum == want["seqnum"]
    assert sorted(uevent.tags) == want["tags"]
    assert dict(uevent.properties) == want["properties"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_capture_serializes_back_byte_for_byte(name: str) -> None:
    # For the udevd captures this checks the header, both MurmurHash2 filter hashes and
    # the tag bloom filter against what real udevd computed.
    data = (GOLDEN / name).read_bytes()
    assert serialize(parse(data)) == data


def test_golden_set_covers_the_required_events() -> None:
    kinds = {(v["wire"], v["subsystem"], v["action"]) for v in EXPECTED.values()}
    assert {
        ("kernel", "block", "add"),
        ("kernel", "block", "remove"),
        ("kernel", "block", "change"),
        ("kernel", "net", "add"),
        ("udev", "block", "add"),
        ("udev", "net", "add"),
    } <= kinds
    synthetic = EXPECTED["kernel-zram-synthetic-change.bin"]["properties"]
    assert synthetic["SYNTH_ARG_HOTRELAY"] == "golden"


def test_murmurhash2_matches_udevd() -> None:
    # Values read from the headers of the udevd captures above.
    assert murmurhash2(b"block") == 0xF0031DB7
    assert murmurhash2(b"disk") == 0x7BCBC5EE
    assert murmurhash2(b"net") == 0xA74D3CC8
    assert murmurhash2(b"bdi") == 0x2A1884A1
    assert murmurhash2(b"") == 0


def test_tag_bloom_matches_udevd() -> None:
    header = (GOLDEN / "udev-zram-add.bin").read_bytes()[:LIBUDEV_HEADER_SIZE]
    hi, lo = struct.unpack(">II", header[32:40])
    assert tag_bloom({"systemd"}) == (hi << 32) | lo == 0x0200040010800000
    assert tag_bloom(()) == 0


def test_kernel_devname_is_relative_and_node_is_absolute() -> None:
    uevent = parse((GOLDEN / "kernel-zram-add.bin").read_bytes())
    assert uevent.devname == "zram1"
    assert uevent.node == "/dev/zram1"
    assert uevent.devnum == (253, 1)
    assert uevent.sysname == "zram1"
    udev = parse((GOLDEN / "udev-zram-add.bin").read_bytes())
    assert udev.node == "/dev/zram1"


def test_cross_wire_serialization_keeps_the_event() -> None:
    kernel = parse((GOLDEN / "kernel-zram-add.bin").read_bytes())
    as_udev = parse(serialize(kernel, Wire.UDEV))
    assert as_udev.wire is Wire.UDEV
    assert dict(as_udev.properties) == dict(kernel.properties)
    assert as_udev.replace(wire=Wire.KERNEL) == kernel


def test_replace_changes_and_removes_properties() -> None:
    kernel = parse((GOLDEN / "kernel-zram-add.bin").read_bytes())
    moved = kernel.replace(DEVNAME="zigbee", SEQNUM=None)
    assert moved.devname == "zigbee"
    assert moved.seqnum is None
    assert "SEQNUM" not in moved.properties
    assert kernel.devname == "zram1"


def test_uevent_is_frozen_hashable_and_checked_when_built() -> None:
    uevent = parse((GOLDEN / "kernel-zram-add.bin").read_bytes())
    assert len({uevent, parse((GOLDEN / "kernel-zram-add.bin").read_bytes())}) == 1
    with pytest.raises(AttributeError):
        uevent.action = "remove"  # type: ignore[misc]
    with pytest.raises(ValueError, match="disagree"):
        Uevent(
            action="remove",
            devpath=uevent.devpath,
            subsystem="block",
            properties={"ACTION": "add", "DEVPATH": uevent.devpath, "SUBSYSTEM": "block"},
        )


# -- malformed input: every class is a UeventParseError naming the problem ----------------

GOOD_PROPS = b"ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=block\0"


def libudev(
    props: bytes,
    *,
    magic: int = 0xFEEDCAFE,
    off: int = 40,
    length: int | None = None,
    header_size: int = 40,
) -> bytes:
    length = len(props) if length is None else length
    header = b"libudev\0" + struct.pack(">I", magic) + struct.pack("=III", header_size, off, length)
    return header + bytes(16) + props


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not NUL-terminated"),
        (b"add@/devices/x", "not NUL-terminated"),
        (b"add/devices/x\0" + GOOD_PROPS, "bad header"),
        (b"@/devices/x\0" + GOOD_PROPS, "bad header"),
        (b"add@devices\0" + GOOD_PROPS, "bad header"),
        (b"add@/devices/x\0DEVPATH=/devices/x\0SUBSYSTEM=block\0", "missing ACTION"),
        (b"add@/devices/x\0ACTION=add\0SUBSYSTEM=block\0", "missing DEVPATH"),
        (b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0", "missing SUBSYSTEM"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"NOEQUALS\0", "malformed field"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"=value\0", "malformed field"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"\0\0", "malformed field"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"ACTION=add\0", "duplicate key"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"SEQNUM=12a\0", "SEQNUM='12a' is not a decimal"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"SEQNUM=+1\0", "not a decimal"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"MAJOR=1\0", "MAJOR and MINOR"),
        (b"add@/devices/x\0" + GOOD_PROPS + b"KEY=\xff\xfe\0", "not UTF-8"),
        (b"remove@/devices/x\0" + GOOD_PROPS, "disagrees"),
        (b"add@/devices/y\0" + GOOD_PROPS, "disagrees"),
        (b"add@/devices/x\0ACTION=add\0DEVPATH=devices/x\0SUBSYSTEM=b\0", "not an absolute"),
        (b"add@/x\0" + b"A=" + b"x" * MAX_MESSAGE_SIZE + b"\0", "over"),
        (b"libudev\0", "shorter than"),
        (libudev(GOOD_PROPS)[:39], "shorter than"),
        (libudev(GOOD_PROPS, magic=0xCAFEFEED), "bad magic"),
        (libudev(GOOD_PROPS, off=8), "inside the 40-byte header"),
        (libudev(GOOD_PROPS, header_size=8), "inside the 40-byte header"),
        (libudev(GOOD_PROPS, off=4000), "run past"),
        (libudev(GOOD_PROPS, length=len(GOOD_PROPS) + 1), "run past"),
        (libudev(GOOD_PROPS, off=0xFFFFFFFF, length=0xFFFFFFFF), "run past"),
        (libudev(b"ACTION=add\0DEVPATH=/x\0SUBSYSTEM=\xc3\0"), "not UTF-8"),
        (libudev(b"ACTION=add\0SUBSYSTEM=block\0"), "missing DEVPATH"),
    ],
)
def test_malformed_input_raises_a_precise_error(data: bytes, message: str) -> None:
    with pytest.raises(UeventParseError, match=message):
        parse(data)


def test_final_nul_is_optional() -> None:
    assert parse(b"add@/devices/x\0" + GOOD_PROPS[:-1]).subsystem == "block"


def test_each_parser_refuses_the_other_format() -> None:
    with pytest.raises(UeventParseError):
        parse_libudev(b"add@/devices/x\0" + GOOD_PROPS)
    with pytest.raises(UeventParseError):
        parse_kernel(libudev(GOOD_PROPS))


# -- properties: round trips and fuzzing ----------------------------------------------------

_no_nul = st.characters(exclude_characters="\0", exclude_categories=["Cs"])
_key = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,20}\Z")
_value = st.text(_no_nul, max_size=40)
_numeric = st.integers(min_value=0, max_value=2**64).map(str)


@st.composite
def uevents(draw: st.DrawFn) -> Uevent:
    action = draw(st.sampled_from(["add", "remove", "change", "move", "bind", "unbind", "online"]))
    devpath = "/" + draw(st.text(_no_nul, max_size=60))
    props: dict[str, str] = {"ACTION": action, "DEVPATH": devpath}
    props["SUBSYSTEM"] = draw(
        st.text(
            _no_nul,
            min_size=1,
            max_size=12,
        )
    )
    extra = draw(st.dictionaries(_key, _value, max_size=12))
    for key in ("ACTION", "DEVPATH", "SUBSYSTEM", "MAJOR", "MINOR", "SEQNUM"):
        extra.pop(key, None)
    props.update(extra)
    if draw(st.booleans()):
        props["MAJOR"], props["MINOR"] = draw(_numeric), draw(_numeric)
    if draw(st.booleans()):
        props["SEQNUM"] = draw(_numeric)
    if draw(st.booleans()):
        props["TAGS"] = (
            ":" + ":".join(draw(st.lists(st.from_regex(r"\A[a-z_]{1,8}\Z"), max_size=4))) + ":"
        )
    return Uevent.from_properties(props, draw(st.sampled_from(Wire)))


@given(uevents())
def test_round_trip_on_its_own_wire(uevent: Uevent) -> None:
    assert parse(serialize(uevent)) == uevent


@given(uevents(), st.sampled_from(Wire))
def test_round_trip_across_wires(uevent: Uevent, wire: Wire) -> None:
    again = parse(serialize(uevent, wire))
    assert again.wire is wire
    assert dict(again.properties) == dict(uevent.properties)


@given(st.binary(max_size=300))
@example(b"libudev\0" + b"\xfe\xed\xca\xfe" + bytes(32))
@example(b"a@/\0")
def test_arbitrary_bytes_never_raise_anything_but_parse_errors(data: bytes) -> None:
    with contextlib.suppress(UeventParseError):
        parse(data)


@given(st.sampled_from(sorted(EXPECTED)), st.data())
def test_mutated_captures_never_raise_anything_but_parse_errors(
    name: str, data: st.DataObject
) -> None:
    raw = bytearray((GOLDEN / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(UeventParseError):
        parse(bytes(raw[:cut]))
