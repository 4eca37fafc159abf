"""Fuzz targets: one function per untrusted-input parser, bytes in, nothing out.

Each target feeds its bytes to one parser and lets through only the error type that
parser documents; anything else escaping (an IndexError, a RecursionError, a plain
ValueError from int()) is a bug. They are shared by three users:

- ``test_fuzz_corpus.py`` replays every file of ``tests/data/crashes/<target>/``
  (inputs that once crashed or hung a parser) through its target;
- ``test_fuzz_atheris.py`` runs ``atheris_driver.py`` (coverage-guided, libFuzzer)
  on each target for a few seconds when atheris is installed;
- the hypothesis tests in ``test_fuzz_inputs.py`` use the same allowed-error lists.

Targets must stay fast per input (libFuzzer's -timeout catches a hang as a crash).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hotrelay.control.protocol import (
    LineBuffer,
    LineTooLong,
    ProtocolError,
    parse_request,
    parse_response,
)
from hotrelay.core import bpf_program as bp
from hotrelay.core.config import ConfigError, load_config_text
from hotrelay.core.device_access import DeviceType
from hotrelay.core.rules import GlobError, Pattern, RuleSetError, load_rules_text
from hotrelay.core.uevent import UeventParseError, parse, serialize

__all__ = ["TARGETS"]


def uevent(data: bytes) -> None:
    """Both wire formats (told apart by libudev's prefix); a parsed event round-trips."""
    try:
        event = parse(data)
    except UeventParseError:
        return
    again = parse(serialize(event))
    assert dict(again.properties) == dict(event.properties)


def rules(data: bytes) -> None:
    with contextlib.suppress(RuleSetError):
        load_rules_text(data.decode("utf-8", "replace"), "fuzz.toml")


def config(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        load_config_text(data.decode("utf-8", "replace"), "fuzz.toml")


def glob(data: bytes) -> None:
    """``GLOB\\0VALUE``: compile a rule's glob and match a device-supplied value with it."""
    text, _, value = data.decode("utf-8", "replace").partition("\0")
    try:
        pattern = Pattern.parse(text)
    except GlobError:
        return
    pattern.matches(value)
    pattern.matches_any(value.split(":"))


def control(data: bytes) -> None:
    """The control socket's line splitter (fed in 7-byte chunks), then each line parsed
    as a request (the daemon's side) and as a response (the client's side)."""
    buffer = LineBuffer(limit=4096)
    lines: list[bytes] = []
    try:
        for start in range(0, len(data), 7):
            lines += buffer.feed(data[start : start + 7])
            assert buffer.pending <= 4096 + 1  # never more than one line's worth held
    except LineTooLong as exc:
        lines += exc.complete  # the daemon answers these, then drops the connection
    for line in lines or [data]:
        with contextlib.suppress(ProtocolError):
            parse_request(line)
        with contextlib.suppress(ProtocolError):
            parse_response(line)


def bpf(data: bytes) -> None:
    """Read-back program bytes: decode, the replay check, our-prefix recognition, and a
    bounded run of what the replay check accepts."""
    try:
        program = bp.decode(data)
    except bp.ProgramError:
        return
    found = bp.split_prepended(program)
    if found is not None and found.grants:
        assert bp.prepend_grants(found.original, found.grants) == program
    if bp.check_replayable(program) is None:
        request = bp.DeviceRequest(DeviceType.BLOCK, 253, 0, bp.DEVCG_ACC_READ)
        with contextlib.suppress(bp.InterpreterError):
            bp.run(program, request.context(), max_steps=10_000)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "uevent": uevent,
    "rules": rules,
    "config": config,
    "glob": glob,
    "control": control,
    "bpf": bpf,
}
