"""Rule files on disk: every ``*.toml`` of a directory, in name order, all or nothing.

A daemon running as root must not load policy that anyone else can write: a rule file,
or the directory holding it, that is owned by another user or writable by group or
others is refused, like sshd's StrictModes. "Another user" means anyone but root and
the user running hotrelay, so ``hotrelay check`` works on one's own checkout.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from hotrelay.core.rules import RuleError, RuleSet, RuleSetError

__all__ = ["DEFAULT_RULES_DIR", "load_rules", "rule_files"]

DEFAULT_RULES_DIR = Path("/etc/hotrelay/rules.d")
# A rule file this large is a mistake (10,000 rules take about 2 MB).
_MAX_FILE = 64 * 1024 * 1024


def _unsafe(info: os.stat_result, what: str) -> str | None:
    if info.st_uid not in (0, os.geteuid()):
        return (
            f"refusing {what} owned by uid {info.st_uid}: only root may own hotrelay policy "
            "(chown root)"
        )
    writable = [
        who
        for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
        if info.st_mode & bit
    ]
    if writable:
        return (
            f"refusing {what} writable by {' and '.join(writable)} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}): a daemon running as root must not "
            "load policy anyone else can write (chmod go-w)"
        )
    return None


def _check_directory(path: Path) -> RuleError | None:
    try:
        info = os.stat(path)
    except OSError as exc:
        return RuleError(str(path), None, f"cannot read: {exc.strerror or exc}")
    problem = _unsafe(info, "a directory")
    return None if problem is None else RuleError(str(path), None, problem)


def _read(path: Path) -> str:
    """The file's text; raises RuleError. Checks the file that was opened, not the name."""
    try:
        # O_NONBLOCK: a FIFO planted as "rules.toml" must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise RuleError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RuleError(str(path), None, "not a regular file")
        problem = _unsafe(info, "a file")
        if problem is not None:
            raise RuleError(str(path), None, problem)
        try:
            data = f.read(_MAX_FILE + 1)
        except OSError as exc:
            raise RuleError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise RuleError(str(path), None, f"larger than {_MAX_FILE // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RuleError(str(path), line, f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def rule_files(directory: Path) -> list[Path]:
    """The ``*.toml`` files of a directory in name order (hidden files skipped: editor temps)."""
    return sorted(
        (p for p in directory.iterdir() if p.name.endswith(".toml") and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def load_rules(paths: Iterable[Path]) -> RuleSet:
    """Load rule files and directories into one RuleSet; raises RuleSetError with all errors."""
    errors: list[RuleError] = []
    sources: list[tuple[str, str]] = []
    order: dict[str, int] = {}  # every path in load order, to report errors in that order
    for path in paths:
        order.setdefault(str(path), len(order))
        if path.is_dir():
            problem = _check_directory(path)
            if problem is not None:
                errors.append(problem)
                continue
            try:
                files = rule_files(path)
            except OSError as exc:
                errors.append(RuleError(str(path), None, f"cannot read: {exc.strerror or exc}"))
                continue
        elif path.exists() or path.is_symlink():
            problem = _check_directory(path.parent)
            if problem is not None:
                errors.append(problem)
                continue
            files = [path]
        else:
            errors.append(RuleError(str(path), None, "no such file or directory"))
            continue
        for file in files:
            order.setdefault(str(file), len(order))
            try:
                sources.append((str(file), _read(file)))
            except RuleError as error:
                errors.append(error)
    try:
        rules = RuleSet.from_texts(sources)
    except RuleSetError as exc:
        errors += exc.errors
    if errors:
        raise RuleSetError(sorted(errors, key=lambda e: (order.get(e.path, -1), e.line or 0)))
    return rules
