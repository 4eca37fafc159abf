"""Match values: a glob, a list of globs (any of them), and ``!glob`` negation.

Globs follow fnmatch(3) as udev uses it: ``*``, ``?``, ``[abc]``, ``[a-z]``, ``[!a]``
(or ``[^a]``), ``\\`` to escape, and ``|`` between alternatives, so values copied from
udev rules keep working. A leading ``!`` negates the whole string. In a list, the
value must match at least one positive entry (if there is any) and no negative one:
``["ttyUSB*", "!ttyUSB9"]`` is every ttyUSB except ttyUSB9.

A value that is absent (no such property or attribute) matches no positive glob and
therefore satisfies a pure negation, as ``ATTR{x}!="y"`` does in udev.

Globs are compiled once at load time. Alternatives without metacharacters are kept
as a set of exact strings: a set lookup is cheaper than a regex, and the rule index
is built from them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["GlobError", "Pattern", "split_alternatives"]

_SPECIAL = frozenset("*?[|\\")


class GlobError(ValueError):
    """A glob that cannot be compiled; the message says where and why."""


def split_alternatives(glob: str) -> list[str]:
    """Split on ``|`` that is neither escaped nor inside a bracket expression."""
    parts: list[str] = []
    start = i = bracket_body = 0
    in_bracket = False
    while i < len(glob):
        char = glob[i]
        if char == "\\":
            i += 2
            continue
        if in_bracket:
            # "]" right after "[" (or "[!") is a member, not the end.
            if char == "]" and i > bracket_body:
                in_bracket = False
        elif char == "[":
            in_bracket = True
            bracket_body = i + 1
            if bracket_body < len(glob) and glob[bracket_body] in "!^":
                bracket_body += 1
        elif char == "|":
            parts.append(glob[start:i])
            start = i + 1
        i += 1
    parts.append(glob[start:])
    return parts


def _class_char(char: str) -> str:
    return "\\" + char if char in "\\]^-[" else char


def _bracket(glob: str, start: int) -> tuple[str, int]:
    """Translate the bracket expression at ``glob[start] == '['``; return (regex, next index)."""
    i = start + 1
    negate = i < len(glob) and glob[i] in "!^"
    if negate:
        i += 1
    members: list[str] = []
    first = True
    while True:
        if i >= len(glob):
            raise GlobError(f"unterminated '[' at position {start + 1}")
        char = glob[i]
        if char == "]" and not first:
            break
        first = False
        if char == "\\":
            if i + 1 >= len(glob):
                raise GlobError("trailing '\\' (escape what?)")
            i += 1
            char = glob[i]
        # A range a-z; "-" first or last in the class is a literal dash.
        if i + 2 < len(glob) and glob[i + 1] == "-" and glob[i + 2] != "]":
            high = glob[i + 2]
            if high == "\\":
                if i + 3 >= len(glob):
                    raise GlobError("trailing '\\' (escape what?)")
                high = glob[i + 3]
                i += 1
            if high < char:
                raise GlobError(f"range '{char}-{high}' is out of order")
            members.append(f"{_class_char(char)}-{_class_char(high)}")
            i += 3
            continue
        members.append(_class_char(char))
        i += 1
    return ("[^" if negate else "[") + "".join(members) + "]", i + 1


def _translate(glob: str) -> tuple[str, str | None]:
    """One alternative to (regex, literal); literal is None when it has metacharacters.

    Matching values can come from devices (a USB serial number), so the regex must not
    backtrack: ``*a*a*a*b`` compiled naively takes exponential time on ``aaaa...``.
    Every piece between stars matches exactly one character, so each run between two
    stars can be taken at its leftmost place and never revisited (an atomic group, as
    CPython's fnmatch does); only the last star backtracks, to find the tail.
    """
    runs: list[list[str]] = [[]]  # regex pieces between stars
    out = runs[0]
    literal: list[str] | None = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "\\":
            if i + 1 >= len(glob):
                raise GlobError("trailing '\\' (escape what?)")
            out.append(re.escape(glob[i + 1]))
            if literal is not None:
                literal.append(glob[i + 1])
            i += 2
            continue
        if char == "*":
            out = []
            runs.append(out)
            literal = None
        elif char == "?":
            out.append(".")
            literal = None
        elif char == "[":
            regex, i = _bracket(glob, i)
            out.append(regex)
            literal = None
            continue
        else:
            out.append(re.escape(char))
            if literal is not None:
                literal.append(char)
        i += 1
    texts = ["".join(run) for run in runs]
    if len(texts) == 1:
        return texts[0], None if literal is None else "".join(literal)
    head, *middle, tail = texts
    atomic = "".join(f"(?>.*?{run})" for run in middle if run)
    return f"{head}{atomic}.*{tail}", None


def _compile(regexes: Sequence[str]) -> re.Pattern[str] | None:
    if not regexes:
        return None
    return re.compile("(?s:" + "|".join(f"(?:{r})" for r in regexes) + ")")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled match value. ``text`` is what the rule said, for messages."""

    text: tuple[str, ...]
    exact: frozenset[str] = field(compare=False)
    has_positive: bool = field(compare=False)
    _positive: re.Pattern[str] | None = field(compare=False, repr=False)
    _negative: re.Pattern[str] | None = field(compare=False, repr=False)

    @classmethod
    def parse(
        cls, value: str | Iterable[str], normalize: Callable[[str], str] | None = None
    ) -> Pattern:
        """Compile a glob or a list of globs; raises GlobError naming the bad one.

        ``normalize`` rewrites each alternative before compiling (for example lowercasing
        hex ids), so the comparison sees the same canonical form as the value.
        """
        texts = (value,) if isinstance(value, str) else tuple(value)
        if not texts:
            raise GlobError("an empty list matches nothing; give at least one glob")
        exact: set[str] = set()
        positive: list[str] = []
        negative: list[str] = []
        has_positive = False
        for text in texts:
            negated = text.startswith("!")
            for alternative in split_alternatives(text[1:] if negated else text):
                if normalize is not None:
                    alternative = normalize(alternative)
                try:
                    regex, literal = _translate(alternative)
                except GlobError as exc:
                    raise GlobError(f"glob {_quote(text)}: {exc}") from None
                if negated:
                    negative.append(regex)
                    continue
                has_positive = True
                if literal is not None:
                    exact.add(literal)
                else:
                    positive.append(regex)
        return cls(texts, frozenset(exact), has_positive, _compile(positive), _compile(negative))

    @property
    def indexable(self) -> frozenset[str] | None:
        """The exact values this pattern is, if it is nothing but exact values."""
        if self._positive is None and self._negative is None and self.exact:
            return self.exact
        return None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return not self.has_positive
        if (
            self.has_positive
            and value not in self.exact
            and (self._positive is None or self._positive.fullmatch(value) is None)
        ):
            return False
        return self._negative is None or self._negative.fullmatch(value) is None

    def matches_any(self, values: Iterable[str]) -> bool:
        """For a set of values (tags): some value matches a positive glob, none a negative."""
        values = tuple(values)
        if self.has_positive and not any(self._positive_match(v) for v in values):
            return False
        negative = self._negative
        return negative is None or not any(negative.fullmatch(v) for v in values)

    def _positive_match(self, value: str) -> bool:
        return value in self.exact or (
            self._positive is not None and self._positive.fullmatch(value) is not None
        )

    def __str__(self) -> str:
        if len(self.text) == 1:
            return _quote(self.text[0])
        return "[" + ", ".join(_quote(t) for t in self.text) + "]"


def _quote(text: str) -> str:
    # JSON string quoting is valid TOML, so a message shows the value as a rule spells it.
    return json.dumps(text, ensure_ascii=False)
