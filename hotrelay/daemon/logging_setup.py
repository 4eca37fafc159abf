"""Logging for the daemon: one line per action, journald-friendly under systemd.

When stderr is connected to the journal (systemd sets JOURNAL_STREAM to the
``device:inode`` of that stream), each line starts with a ``<N>`` syslog priority,
which journald turns into the entry's PRIORITY, and carries no timestamp (journald
adds its own). Otherwise lines get a timestamp and the level name. Multi-line messages
(tracebacks) repeat the prefix on every line so that no line loses its priority.

Actions are logged with ``format_action`` as ``key=value`` pairs, always in the same
order, so that ``journalctl -u hotrelay | grep container=lxc:ha`` finds them:

    action=grant container=lxc:homeassistant device=/dev/ttyUSB0 outcome=ok duration_ms=0.8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JournalFormatter",
    "TextFormatter",
    "add_logging_options",
    "format_action",
    "setup_logging",
    "stream_is_journal",
]

LOG_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LOG_FORMATS = ("auto", "text", "journal")

# sd-daemon(3) priorities for each logging level.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def _short_name(name: str) -> str:
    return name.removeprefix("hotrelay.") if name != "hotrelay" else name


class JournalFormatter(logging.Formatter):
    """``<6>executor: message`` on every line; journald supplies time and identifier."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>{_short_name(record.name)}: "
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:03.123 INFO executor: message``."""

    def __init__(self) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        stamp = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}"
        prefix = f"{stamp} {record.levelname} {_short_name(record.name)}: "
        lines = text.splitlines() or [""]
        return "\n".join([prefix + lines[0], *("    " + line for line in lines[1:])])


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` is the journal stream systemd connected (JOURNAL_STREAM=dev:ino).

    Comparing the inode, not just the variable's presence, matters: a child whose stderr
    was redirected inherits the variable but not the journal.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, colon, inode = value.partition(":")
    if not colon:
        return False
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


_HANDLER_NAME = "hotrelay"


def setup_logging(
    level: str = "info",
    log_format: str = "auto",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send the root logger to ``stream`` (stderr) at ``level``, replacing an earlier call's
    handler (a reload may change the level). Returns the handler."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    out = sys.stderr if stream is None else stream
    journal = log_format == "journal" or (log_format == "auto" and stream_is_journal(out, environ))
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JournalFormatter() if journal else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS[level])
    # Libraries' debug output (every netlink message pyroute2 parses, asyncio's
    # selector) would drown ours at --log-level debug; their warnings still show.
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(LOG_LEVELS[level], logging.INFO))
    return handler


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text)


def format_action(action: str, container: str, device: str, outcome: str, **details: Any) -> str:
    """One line for one action: what, where, on which device, how it went, then details.

    Values with spaces, quotes or ``=`` are quoted JSON-style so the line splits cleanly.
    Details given as None are left out.
    """
    fields = {"action": action, "container": container, "device": device, "outcome": outcome}
    fields.update({key: value for key, value in details.items() if value is not None})
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` (default: from the config file)."""
    parser.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        help="log this level and above (default: log_level in the config, else info)",
    )
    parser.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        help="journal: <N> priority prefixes, no timestamps; text: timestamps; "
        "auto (default): journal when stderr is the journal",
    )
