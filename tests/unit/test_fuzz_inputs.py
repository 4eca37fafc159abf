"""Fuzzing what the existing per-module fuzz tests leave out: size, depth, time, memory.

The modules' own tests already fuzz short random inputs (test_uevent.py: bytes up to
300 and mutated captures; test_rules_loader.py and test_config.py: random text and
random rule/config documents; test_control_protocol.py: random request bytes and
structures, random chunking; test_bpf_program.py: encode/decode round trips and
verdicts of generated programs). Here:

- inputs at the size limits (64 KiB uevents, 64 KiB request lines), with a deadline
  and a bound on the memory one parse may allocate;
- hostile *structure*: numbers of thousands of digits, TOML nested thousands deep,
  globs whose naive regex backtracks exponentially, random instruction streams fed to
  the BPF replay check and prefix recognition, mutations of our own granted programs;
- hostile property values (a USB serial number is chosen by whoever built the device)
  expanded into node and symlink paths: every planned path stays under /dev.

Each property allows exactly the error type the module documents (see fuzz_targets.py).
Inputs that once broke a parser are replayed from tests/data/crashes/ by
test_fuzz_corpus.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hotrelay.control.protocol import (
    MAX_LINE,
    LineBuffer,
    LineTooLong,
    ProtocolError,
    parse_request,
    parse_response,
)
from hotrelay.core import bpf_program as bp
from hotrelay.core.config import ConfigError, load_config_text
from hotrelay.core.device_access import Access, DeviceRule, DeviceType
from hotrelay.core.plan import MakeNode, MakeSymlink, SkipRule, plan_for
from hotrelay.core.rules import Pattern, RuleSet, RuleSetError, load_rules_text
from hotrelay.core.uevent import (
    LIBUDEV_HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Uevent,
    UeventParseError,
    Wire,
    parse,
    serialize,
)

BIG = settings(
    max_examples=60,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def allocation_peak() -> Iterator[list[int]]:
    """The peak bytes Python allocated inside the block (tracemalloc), in out[0]."""
    out = [0]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield out
        out[0] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@contextlib.contextmanager
def no_hang(seconds: float = 5.0) -> Iterator[None]:
    """A hang fails the example instead of stalling the run (hypothesis's deadline only
    looks at the clock once the call returns)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# -- uevents at the size limit ---------------------------------------------------------------

_key = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,30}\Z")
_hostile_value = st.one_of(
    st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=2000),
    st.integers(1, 20_000).map(lambda n: "9" * n),  # numbers of thousands of digits
    st.sampled_from(["", "=", "a=b", "\n", "+1", " 1", "1_000", "١٢", "0x10", "-1"]),
)


@st.composite
def hostile_property_blobs(draw: st.DrawFn) -> bytes:
    """KEY=VALUE\\0 fields, mostly well-formed, with hostile values and repeated keys."""
    fields = [b"ACTION=add", b"DEVPATH=/devices/virtual/block/zram9", b"SUBSYSTEM=block"]
    for _ in range(draw(st.integers(0, 40))):
        key = draw(
            st.one_of(
                _key, st.sampled_from(["SEQNUM", "MAJOR", "MINOR", "ACTION", "DEVPATH", "DEVNAME"])
            )
        )
        fields.append(f"{key}={draw(_hostile_value)}".encode())
    if draw(st.booleans()):
        fields.append(draw(st.binary(max_size=64)))  # raw garbage, maybe not UTF-8
    draw(st.randoms()).shuffle(fields)
    return b"\0".join(fields) + b"\0" * draw(st.integers(0, 2))


def _libudev(props: bytes, off: int = LIBUDEV_HEADER_SIZE, length: int | None = None) -> bytes:
    length = len(props) if length is None else length
    return (
        b"libudev\0"
        + struct.pack(">I", 0xFEEDCAFE)
        + struct.pack("=III", LIBUDEV_HEADER_SIZE, off, length)
        + bytes(16)
        + props
    )


@BIG
@given(hostile_property_blobs(), st.booleans(), st.integers(0, 3))
@example(b"ACTION=add\0DEVPATH=/x\0SUBSYSTEM=b\0SEQNUM=" + b"1" * 5000 + b"\0", False, 0)
@example(b"ACTION=add\0DEVPATH=/x\0SUBSYSTEM=b\0MAJOR=" + b"1" * 5000 + b"\0MINOR=1\0", True, 0)
def test_hostile_uevents_raise_only_parse_errors(props: bytes, udev: bool, cut: int) -> None:
    data = _libudev(props) if udev else b"add@/devices/virtual/block/zram9\0" + props
    data = data[: len(data) - cut]
    try:
        with no_hang():
            event = parse(data)
    except UeventParseError as exc:
        message = str(exc)
        assert message  # every refusal says why
        return
    # What parses is consistent and survives a round trip on either wire.
    for wire in Wire:
        assert dict(parse(serialize(event, wire)).properties) == dict(event.properties)


@pytest.mark.parametrize("udev", [False, True], ids=["kernel", "libudev"])
@pytest.mark.parametrize("size", [MAX_MESSAGE_SIZE - 100, MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1])
def test_a_message_at_the_size_limit_is_bounded_in_time_and_memory(udev: bool, size: int) -> None:
    """A 64 KiB message of 4,000 small fields (the worst case for per-field work)."""
    fields = b"".join(b"K%05d=v\0" % i for i in range(4000))
    head = b"ACTION=add\0DEVPATH=/x\0SUBSYSTEM=b\0"
    body = head + fields
    wrap = _libudev if udev else (lambda p: b"add@/x\0" + p)
    body += b"P=" + b"x" * (size - len(wrap(body)) - 3) + b"\0"
    data = wrap(body)
    assert len(data) == size
    with allocation_peak() as peak:
        seconds = timed(lambda: _try(data))
    assert seconds < 0.5
    # The input, its decoded text, the split fields and the dict: a small multiple.
    assert peak[0] < 40 * size, f"{peak[0]} bytes allocated to parse {size}"


def _try(data: bytes) -> None:
    with contextlib.suppress(UeventParseError):
        parse(data)


@BIG
@given(st.binary(min_size=LIBUDEV_HEADER_SIZE, max_size=200), st.integers(0, 2**32 - 1))
def test_libudev_offsets_anywhere_in_the_u32_range(props: bytes, off: int) -> None:
    with contextlib.suppress(UeventParseError):
        parse(_libudev(props, off=off))
    with contextlib.suppress(UeventParseError):
        parse(_libudev(props, length=off))


# -- rule and config files: depth and size --------------------------------------------------


@pytest.mark.parametrize("depth", [10, 300, 1000, 5000])
@pytest.mark.parametrize(
    "shape",
    [
        'match.kernel = {open}"x"{close}',
        "match = {open}1{close}",
    ],
    ids=["arrays", "tables"],
)
def test_deeply_nested_toml_is_a_rule_error(depth: int, shape: str) -> None:
    """tomllib recurses once per level: at a few hundred it raised RecursionError, which
    escaped the loaders (a traceback from `hotrelay check`, a dead daemon on reload)."""
    nested = (
        shape.format(open="[" * depth, close="]" * depth)
        if "kernel" in shape
        else shape.format(open="{ env = " * depth, close="}" * depth)
    )
    text = f'[[rule]]\nname = "deep"\ntarget = "lxc:a"\n{nested}\n'
    with pytest.raises(RuleSetError) as caught:
        load_rules_text(text, "deep.toml")
    assert all(str(e).startswith("deep.toml:") for e in caught.value.errors)
    config_text = "rules_dir = " + "[" * depth + '"/x"' + "]" * depth + "\n"
    with pytest.raises(ConfigError):
        load_config_text(config_text, "deep.toml")


@BIG
@given(
    st.lists(
        st.sampled_from(["[", "]", "{", "}", "a = ", "[[rule]]\n", '"x"', ", ", "\n", "b.c = 1\n"]),
        max_size=3000,
    ).map("".join)
)
def test_bracket_soup_gives_rule_errors_only(text: str) -> None:
    with contextlib.suppress(RuleSetError):
        load_rules_text(text, "soup.toml")
    with contextlib.suppress(ConfigError):
        load_config_text(text, "soup.toml")


def test_a_large_valid_rule_file_loads_in_bounded_time() -> None:
    text = "".join(
        f'[[rule]]\nname = "r{i}"\ntarget = ["lxc:c{i}", "pid:{i + 1}"]\n'
        f'[rule.match]\nsubsystem = "tty"\nkernel = "ttyUSB{i}*|ttyACM{i}"\n'
        f'[rule.device]\npath = "/dev/serial/r{i}"\nmode = "0660"\n'
        for i in range(2000)
    )
    seconds = timed(lambda: load_rules_text(text, "big.toml"))
    assert seconds < 20, f"2,000 rules took {seconds:.1f} s"


# -- globs: a device-supplied value must never make matching explode ----------------------------

_PATHOLOGICAL = [
    ("*a*a*a*a*a*a*a*a*a*a*a*a*b", "a" * 4000),
    ("*?*?*?*?*?*?*?*?*?*?*?*b", "a" * 4000),
    ("*[ab]*[ab]*[ab]*[ab]*[ab]*[ab]*c", "ab" * 2000),
    ("a*a*a*a*a*a*a*a*a*a*a*", "a" * 4000 + "b"),  # ends in a star: fails on the head
    ("*a*a*a*a*a*a*a*a*a*a*a*a*b|*x*x*x*x*x*x*x*y", "a" * 2000 + "x" * 2000),
]


@pytest.mark.parametrize(("glob", "value"), _PATHOLOGICAL)
def test_pathological_globs_match_in_linear_time(glob: str, value: str) -> None:
    """Before the fix `*a*a*a*a*b` took 4.5 s on a 256-character value (a USB serial
    number's size) and 12 stars did not finish on 40 characters."""
    pattern = Pattern.parse(glob)
    negated = Pattern.parse("!" + glob)
    seconds = timed(lambda: (pattern.matches(value), negated.matches(value)))
    assert seconds < 0.2
    assert pattern.matches(value) is fnmatch.fnmatchcase(value, glob) or "|" in glob


_glob_piece = st.sampled_from(["a", "b", "*", "?", "[ab]", "[!a]", "[a-b]", "\\*", "\\?", "**"])


def _as_fnmatch(glob: str) -> str:
    # fnmatch has no backslash escape: a bracket of one character is the same thing.
    return glob.replace("\\*", "[*]").replace("\\?", "[?]")


@settings(max_examples=500)
@given(st.lists(_glob_piece, max_size=8).map("".join), st.text(alphabet="ab*?", max_size=10))
def test_globs_with_classes_and_escapes_agree_with_fnmatch(glob: str, value: str) -> None:
    """The non-backtracking translation keeps fnmatch's meaning (test_rules_glob.py
    compares `ab*?` globs; this adds classes, negated classes and escapes)."""
    assert Pattern.parse(glob).matches(value) is fnmatch.fnmatchcase(value, _as_fnmatch(glob))


# -- planned paths: hostile property values never leave /dev -----------------------------------

_PLAN_RULE = """
[[rule]]
name = "hostile"
target = "lxc:c"
[rule.match]
subsystem = "tty"
[rule.device]
path = "{path}"
symlinks = ["serial/by-id/{{ID_SERIAL}}", "{{ID_MODEL}}/x", "by-path/{{ID_PATH}}-port"]
"""
_evil = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(["..", "../..", "/", "/etc/shadow", "a/../../b", ".", "", "\n", "x\0y"]),
    st.lists(st.sampled_from(["..", ".", "", "a", "/", "dev"]), max_size=8).map("/".join),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["{ID_SERIAL}", "tty/{ID_MODEL}", "/dev/{ID_PATH}", "{kernel}"]),
    _evil,
    _evil,
    _evil,
)
def test_planned_paths_stay_under_dev_whatever_the_device_says(
    path: str, serial: str, model: str, id_path: str
) -> None:
    (rule,) = RuleSet.from_texts([("h.toml", _PLAN_RULE.format(path=path))]).rules
    props = {
        "ACTION": "add",
        "DEVPATH": "/devices/pci0000:00/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0",
        "SUBSYSTEM": "tty",
        "DEVNAME": "/dev/ttyUSB0",
        "MAJOR": "188",
        "MINOR": "0",
        "ID_SERIAL": serial,
        "ID_MODEL": model,
        "ID_PATH": id_path,
    }
    try:
        event = Uevent.from_properties(props, Wire.UDEV)
    except UeventParseError:
        return
    for action in plan_for(event, [rule]):
        for planned in _paths(action):
            assert planned.startswith("/dev/"), planned
            parts = planned.split("/")[2:]
            assert all(part not in ("", ".", "..") for part in parts), planned
            assert "\0" not in planned


def _paths(action: object) -> list[str]:
    if isinstance(action, MakeNode):
        return [action.path]
    if isinstance(action, MakeSymlink):
        return [action.link]
    assert isinstance(action, SkipRule) or not hasattr(action, "path")
    return []


# -- the control protocol at its limits --------------------------------------------------------


@BIG
@given(
    st.lists(st.binary(max_size=3000), max_size=20),
    st.lists(st.integers(1, 5000), min_size=1, max_size=10),
    st.integers(16, 4096),
)
def test_line_buffer_never_holds_more_than_its_limit(
    parts: list[bytes], chunks: list[int], limit: int
) -> None:
    """However the bytes arrive, one connection's buffer stays within limit + 1 (the CR
    of a CRLF), every line returned is within the limit, and a refusal is final."""
    stream = b"\n".join(parts)
    buffer = LineBuffer(limit=limit)
    position, index = 0, 0
    while position < len(stream):
        size = chunks[index % len(chunks)]
        index += 1
        try:
            lines = buffer.feed(stream[position : position + size])
        except LineTooLong as exc:
            complete = exc.complete
            assert all(len(line) <= limit for line in complete)
            with pytest.raises(LineTooLong):
                buffer.feed(b"\n")
            return
        position += size
        assert buffer.pending <= limit + 1
        assert all(len(line) <= limit for line in lines)


def test_a_request_line_at_the_limit_is_bounded_in_time_and_memory() -> None:
    pad = MAX_LINE - len(b'{"id":1,"verb":"attach","args":{"target":"","device":"/dev/x"}}')
    line = b'{"id":1,"verb":"attach","args":{"target":"' + b"x" * pad + b'","device":"/dev/x"}}'
    assert len(line) == MAX_LINE
    deep = b"[" * (MAX_LINE // 2) + b"]" * (MAX_LINE // 2)
    numbers = b'{"id":' + b"9" * (MAX_LINE - 8) + b"}"
    for raw in (line, deep, numbers):
        with allocation_peak() as peak:
            start = time.perf_counter()
            _request_or_error(raw)
            seconds = time.perf_counter() - start
        assert seconds < 0.5
        assert peak[0] < 64 * MAX_LINE


def _request_or_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(raw)


_JSON_TOKENS = ['{', '}', '[', ']', '"id"', '"ok"', '"event"', ":", ",", "1", "true", "null",
                '"x"', "1e999", "-0", "NaN", '"\\ud800"', "9" * 30]  # fmt: skip
_json_soup = st.lists(st.sampled_from(_JSON_TOKENS), max_size=200).map("".join)


@settings(max_examples=300)
@given(st.one_of(_json_soup.map(str.encode), st.binary(max_size=300)))
@example(b"[" * 100_000)
@example(b'{"id": 1, "ok": true, "result": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
def test_the_client_parses_any_line_or_raises_protocol_error(raw: bytes) -> None:
    """parse_response is the client's side (``hotrelay status`` reading the daemon's
    socket); the request side has its own fuzz tests in test_control_protocol.py."""
    for parser in (parse_response, parse_request):
        with contextlib.suppress(ProtocolError):
            parser(raw)


# -- BPF programs read back from the kernel ----------------------------------------------------

_opcodes = st.one_of(
    st.integers(0, 0xFF),
    st.sampled_from([0x95, 0x85, 0x05, 0x06, 0x18, 0x00, 0x61, 0x63, 0xB7, 0xB4, 0x15, 0x55]),
)
_insns = st.builds(
    bp.Insn,
    _opcodes,
    st.integers(0, 0xF),
    st.integers(0, 0xF),
    st.one_of(st.integers(-4, 4), st.integers(-0x8000, 0x7FFF)),
    st.one_of(st.integers(-4, 4), st.integers(-0x8000_0000, 0x7FFF_FFFF)),
)


def _check_program(program: tuple[bp.Insn, ...]) -> None:
    with no_hang():
        _check_program_now(program)


def _check_program_now(program: tuple[bp.Insn, ...]) -> None:
    reason = bp.check_replayable(program)
    assert reason is None or isinstance(reason, str)
    found = bp.split_prepended(program)
    if found is not None and found.grants:
        # Recognised as ours only if it is exactly what prepend_grants makes.
        assert bp.prepend_grants(found.original, found.grants) == program
    if reason is None:
        request = bp.DeviceRequest(DeviceType.CHAR, 1, 3, bp.DEVCG_ACC_READ)
        with contextlib.suppress(bp.InterpreterError):
            bp.run(program, request.context(), max_steps=5000)


@settings(max_examples=400)
@given(st.lists(_insns, max_size=60).map(tuple))
def test_random_instruction_streams(program: tuple[bp.Insn, ...]) -> None:
    _check_program(program)


@settings(max_examples=300)
@given(st.binary(max_size=800))
def test_random_bytes_decode_or_raise_program_error(raw: bytes) -> None:
    try:
        program = bp.decode(raw)
    except bp.ProgramError:
        assert len(raw) % 8
        return
    assert bp.encode(program) == raw
    _check_program(program)


_grant = st.builds(
    DeviceRule,
    st.sampled_from([DeviceType.BLOCK, DeviceType.CHAR, DeviceType.ALL]),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.builds(Access, st.booleans(), st.booleans(), st.booleans()).filter(
        lambda a: a.read or a.write or a.mknod
    ),
)
_ORIGINAL = bp.assemble([DeviceRule.parse("a", allow=False), DeviceRule.parse("c 1:3 rwm")])


@settings(max_examples=300)
@given(
    st.lists(_grant, min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 4), st.integers(-2**31, 2**31 - 1)),
             min_size=1, max_size=4),
)  # fmt: skip
def test_mutated_granted_programs_are_recognised_exactly_or_not_at_all(
    grants: list[DeviceRule], mutations: list[tuple[int, int, int]]
) -> None:
    """Our own prefix, corrupted (a runtime or another tool rewrote the program): either
    it is not taken for ours, or what is taken rebuilds the program bit for bit, so a
    revoke can never restore a program we did not make."""
    program = list(bp.prepend_grants(_ORIGINAL, grants))
    found = bp.split_prepended(program)
    assert found is not None
    assert found.original == _ORIGINAL
    for where, field, value in mutations:
        at = where % len(program)
        insn = program[at]
        fields = [insn.op, insn.dst, insn.src, insn.off, insn.imm]
        bounds = [(0, 0xFF), (0, 0xF), (0, 0xF), (-0x8000, 0x7FFF), (-(2**31), 2**31 - 1)]
        low, high = bounds[field]
        fields[field] = min(max(value, low), high)
        program[at] = bp.Insn(*fields)
    _check_program(tuple(program))
    with contextlib.suppress(bp.ProgramError):
        bp.prepend_code(bp.encode(program), grants)
