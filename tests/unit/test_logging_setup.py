"""Log lines: journald priorities when stderr is the journal, timestamps otherwise."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrelay.daemon.logging_setup import (
    JournalFormatter,
    TextFormatter,
    format_action,
    setup_logging,
    stream_is_journal,
)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(level: int, message: str, name: str = "hotrelay.executor") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
        (25, "<6>"),  # a custom level between INFO and WARNING
    ],
)
def test_journal_priorities(level: int, prefix: str) -> None:
    assert JournalFormatter().format(record(level, "granted")) == f"{prefix}executor: granted"


def test_journal_prefixes_every_line_of_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = logging.LogRecord(
            "hotrelay.control", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    lines = JournalFormatter().format(entry).splitlines()
    assert lines[0] == "<3>control: failed"
    assert len(lines) > 3
    assert all(line.startswith("<3>control: ") for line in lines)
    assert lines[-1] == "<3>control: ValueError: boom"


def test_text_has_a_timestamp_and_indents_continuation_lines() -> None:
    text = TextFormatter().format(record(logging.WARNING, "first\nsecond", name="hotrelay"))
    first, second = text.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING hotrelay: first", first)
    assert second == "    second"


def test_journal_detection_compares_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        info = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        assert not stream_is_journal(stream, {})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no fileno


def test_setup_logging_auto_picks_the_journal_format(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        setup_logging("debug", stream=stream, environ=env)
        logging.getLogger("hotrelay.executor").debug("journal line")
        setup_logging("info", "text", stream=stream, environ=env)  # replaces the handler
        logging.getLogger("hotrelay.executor").debug("hidden at info")
        logging.getLogger("hotrelay.executor").info("text line")
    lines = path.read_text().splitlines()
    assert lines[0] == "<7>executor: journal line"
    assert lines[1].endswith(" INFO executor: text line")
    assert len(lines) == 2


def test_setup_logging_refuses_unknown_settings() -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        setup_logging("loud")
    with pytest.raises(ValueError, match="log format 'json'"):
        setup_logging("info", "json")


def test_one_line_per_action() -> None:
    assert format_action("grant", "lxc:ha", "/dev/ttyUSB0", "ok", duration_ms=0.8) == (
        "action=grant container=lxc:ha device=/dev/ttyUSB0 outcome=ok duration_ms=0.8"
    )
    assert format_action(
        "make-node", "docker:z2m", "/dev/my dev", "failed", error='EPERM: "no"', skipped=None
    ) == (
        'action=make-node container=docker:z2m device="/dev/my dev" outcome=failed '
        'error="EPERM: \\"no\\""'
    )
