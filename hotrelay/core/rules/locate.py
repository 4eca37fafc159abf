"""Line numbers for TOML keys, which tomllib does not report.

``Locator`` scans the source text once and remembers, for each ``[[rule]]`` table (by
position) and each key path inside it, the line where it is written: headers such as
``[rule.match]``, keys such as ``kernel = ...``, dotted keys such as
``env.ID_SERIAL = ...``. A key inside an inline table resolves to the line of the table
(``usb = { vendor = ... }``), which is where the operator looks anyway.

It understands just enough TOML to not be fooled: strings (including multi-line ones)
and brackets spanning lines. It only ever sees text tomllib has already accepted, and
it never raises: a line it does not understand is skipped.
"""

from __future__ import annotations

__all__ = ["Locator"]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}

Path = tuple[str, ...]


def _basic_string(text: str, i: int) -> tuple[str, int]:
    """Decode the basic string opening at ``text[i] == '"'``; return (value, index after)."""
    out: list[str] = []
    i += 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\\" and i + 1 < len(text):
            code = text[i + 1]
            if code in "uU":
                width = 4 if code == "u" else 8
                digits = text[i + 2 : i + 2 + width]
                try:
                    out.append(chr(int(digits, 16)))
                except ValueError:
                    out.append(digits)
                i += 2 + width
                continue
            out.append(_ESCAPES.get(code, code))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out), i


def _key_path(text: str, i: int) -> tuple[Path, int] | None:
    """Parse a dotted key at ``text[i]``; return (parts, index after) or None."""
    parts: list[str] = []
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text):
            return None
        char = text[i]
        if char == '"':
            part, i = _basic_string(text, i)
        elif char == "'":
            end = text.find("'", i + 1)
            if end < 0:
                return None
            part, i = text[i + 1 : end], end + 1
        else:
            start = i
            while i < len(text) and text[i] in _BARE:
                i += 1
            if i == start:
                return None
            part = text[start:i]
        parts.append(part)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return tuple(parts), i


class Locator:
    """Where keys are written in one TOML document."""

    def __init__(self, text: str) -> None:
        self.rule_lines: list[int] = []  # line of each [[rule]] header, in order
        self._lines: dict[tuple[int | None, Path], int] = {}
        self._scan(text)

    def _remember(self, rule: int | None, path: Path, line: int) -> None:
        # Every prefix too, at its first appearance: "match" for "match.kernel = ...".
        for end in range(1, len(path) + 1):
            self._lines.setdefault((rule, path[:end]), line)

    def _scan(self, text: str) -> None:
        rule: int | None = None
        table: Path = ()
        depth = 0  # open [ and { of a value spanning lines
        multiline: str | None = None  # the closing delimiter of an open multi-line string
        # TOML ends lines with LF or CRLF only; str.splitlines() would also split on
        # U+2028 and friends, which TOML allows inside strings, and miscount.
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw[:-1] if raw.endswith("\r") else raw
            i = 0
            if multiline is None and depth == 0:
                stripped = line.lstrip(" \t")
                i = len(line) - len(stripped)
                if not stripped or stripped.startswith("#"):
                    continue
                if stripped.startswith("["):
                    array = stripped.startswith("[[")
                    parsed = _key_path(line, i + (2 if array else 1))
                    if parsed is None:
                        continue
                    path = parsed[0]
                    if path[0] == "rule":
                        if array and len(path) == 1:
                            self.rule_lines.append(lineno)
                            rule = len(self.rule_lines) - 1
                        elif len(path) == 1:
                            rule = None  # [rule]: a plain table, an error the loader reports
                        table = path[1:]
                        if rule is None:
                            self._remember(None, path, lineno)
                        else:
                            self._remember(rule, table, lineno)
                    else:
                        rule, table = None, path
                        self._remember(None, path, lineno)
                    continue
                parsed = _key_path(line, i)
                if parsed is None:
                    continue
                path, i = parsed
                if i >= len(line) or line[i] != "=":
                    continue
                self._remember(rule, table + path, lineno)
                i += 1
            depth, multiline = self._scan_value(line, i, depth, multiline)

    @staticmethod
    def _scan_value(line: str, i: int, depth: int, multiline: str | None) -> tuple[int, str | None]:
        """Track brackets and multi-line strings through the rest of a line."""
        while i < len(line):
            if multiline is not None:
                end = line.find(multiline, i)
                if multiline == '"""':
                    # An escaped quote does not close the string.
                    while end > 0 and _escaped(line, end):
                        end = line.find(multiline, end + 1)
                if end < 0:
                    return depth, multiline
                i = end + 3
                # A string may end with up to two extra quotes ('''a'''''): skip them.
                while i < len(line) and line[i] == multiline[0]:
                    i += 1
                multiline = None
                continue
            char = line[i]
            if char == "#":
                break
            if char in "\"'":
                if line.startswith(char * 3, i):
                    multiline = char * 3
                    i += 3
                    continue
                if char == '"':
                    i = _basic_string(line, i)[1]
                else:
                    end = line.find("'", i + 1)
                    i = len(line) if end < 0 else end + 1
                continue
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth = max(0, depth - 1)
            i += 1
        return depth, multiline

    def line_of(self, rule: int | None, path: Path = ()) -> int:
        """The line of ``path`` in rule number ``rule`` (or at top level for None).

        Falls back to the closest enclosing key, then to the rule's header, then to 1.
        """
        for end in range(len(path), 0, -1):
            line = self._lines.get((rule, path[:end]))
            if line is not None:
                return line
        if rule is not None and 0 <= rule < len(self.rule_lines):
            return self.rule_lines[rule]
        return self._lines.get((None, ("rule",)), 1)


def _escaped(line: str, index: int) -> bool:
    backslashes = 0
    while index - backslashes - 1 >= 0 and line[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1
