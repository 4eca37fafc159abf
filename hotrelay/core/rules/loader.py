"""Rule files: TOML text in, validated rules out, every problem as ``path:line: message``.

Pure: the caller reads the file (``hotrelay.rules_files`` does, with its permission
checks) and hands over the text. Each setting has its own small parser and message,
naming the key and what was expected there; unknown keys are errors, never ignored.
All problems of a file are reported together, and any problem rejects the whole file.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from hotrelay.core.device_access import Access
from hotrelay.core.rules.errors import RuleError, RuleSetError
from hotrelay.core.rules.glob import GlobError, Pattern, split_alternatives
from hotrelay.core.rules.locate import Locator
from hotrelay.core.rules.match import (
    Attr,
    Attrs,
    Condition,
    Driver,
    Env,
    EventField,
    Pci,
    Tag,
    Usb,
    normalize_hex,
)
from hotrelay.core.rules.model import (
    DeviceSpec,
    NetdevSpec,
    Owner,
    Rule,
    Source,
    Target,
    TargetError,
    UeventMode,
)
from hotrelay.core.rules.template import (
    Template,
    TemplateError,
    check_dev_template,
    check_ifname,
)

__all__ = ["Declared", "check_unique_names", "load_rules_text"]

T = TypeVar("T")
KeyPath = tuple[str, ...]

RULE_KEYS = ("name", "description", "target", "match", "device", "netdev")
EVENT_KEYS = ("action", "subsystem", "devtype", "kernel", "devname")
MATCH_KEYS = (*EVENT_KEYS, "driver", "tag", "env", "attr", "attrs", "usb", "pci")
ID_KEYS: Mapping[str, tuple[str, ...]] = {
    "usb": ("vendor", "product", "serial"),
    "pci": ("vendor", "device", "slot"),
}
HEX_KEYS = frozenset({"vendor", "product", "device"})
DEVICE_KEYS = ("path", "mode", "owner", "group", "access", "symlinks", "uevent")
NETDEV_KEYS = ("name",)

_RULE_NAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,128}\Z")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?\Z")
_MODE = re.compile(r"[0-7]{3,4}\Z")
_HEX_ID = re.compile(r"[0-9a-f]{4}\Z")
_HEX_GLOB = re.compile(r"[0-9a-f*?\[\]!^\-]+\Z")
_TOML_POSITION = re.compile(r" \(at (?:line (\d+), column (\d+)|end of document)\)\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_MAX_ID = 2**32 - 2
ROOT: Owner = 0  # (uid_t)-1 means "no change" to chown


class _Invalid(Exception):
    """One bad setting: ``key`` is its path relative to the rule, for the locator."""

    def __init__(self, key: KeyPath, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _got(value: object) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
        datetime.datetime: "date-time",
        datetime.date: "date",
        datetime.time: "time",
    }.get(type(value), type(value).__name__)
    if isinstance(value, str | bool | int | float):
        return f"got {kind} {_show(value)}"
    return f"got {'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _dotted(key: KeyPath) -> str:
    return ".".join(k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False) for k in key)


def _unknown(where: KeyPath, key: str, known: Sequence[str]) -> _Invalid:
    if where and key in RULE_KEYS:
        # The classic TOML slip: a key written after [rule.match] belongs to that table.
        hint = f" ({key} belongs to the rule itself: write it before [rule.{where[0]}])"
    else:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {_show(close[0])}?)" if close else ""
    prefix = f"{_dotted(where)}: " if where else ""
    return _Invalid(
        (*where, key),
        f"{prefix}unknown key {_show(key)}{hint}; expected one of {', '.join(sorted(known))}",
    )


def _string(key: KeyPath, value: object, expected: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(key, f"{_dotted(key)}: expected {expected}, {_got(value)}")
    return value


def _strings(key: KeyPath, value: object, expected: str) -> tuple[str, ...]:
    """A string or an array of strings (``expected`` describes one)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        if not value:
            raise _Invalid(key, f"{_dotted(key)}: empty array; expected {expected}")
        for item in value:
            if not isinstance(item, str):
                raise _Invalid(
                    key, f"{_dotted(key)}: expected {expected} in the array, {_got(item)}"
                )
        return tuple(value)
    raise _Invalid(key, f"{_dotted(key)}: expected {expected} or an array of them, {_got(value)}")


def _table(key: KeyPath, value: object, example: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(key, f"{_dotted(key)}: expected a table such as {example}, {_got(value)}")
    return value


def _pattern(
    key: KeyPath,
    value: object,
    *,
    normalize: Callable[[str], str] | None = None,
    check: Callable[[str], str | None] | None = None,
) -> Pattern:
    texts = _strings(key, value, "a glob string")
    if check is not None:
        for text in texts:
            for alternative in split_alternatives(text.removeprefix("!")):
                problem = check(alternative)
                if problem is not None:
                    raise _Invalid(key, f"{_dotted(key)}: {_show(text)} {problem}")
    try:
        return Pattern.parse(texts, normalize)
    except GlobError as exc:
        raise _Invalid(key, f"{_dotted(key)}: {exc}") from None


def _devname_glob(alternative: str) -> str:
    # DEVNAME is relative on the kernel wire and absolute from udevd: rules say either,
    # and both compare with the absolute node path.
    return alternative if alternative.startswith("/") else "/dev/" + alternative


def _check_hex(alternative: str) -> str | None:
    lowered = normalize_hex(alternative)
    if _HEX_ID.match(lowered):
        return None
    if lowered and _HEX_GLOB.match(lowered) and any(c in lowered for c in "*?["):
        return None
    return 'is not a 4-digit hex id such as "10c4" (globs and arrays are fine)'


def _check_attribute_name(name: str) -> str | None:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        return "is not an attribute name (a file in the device's sysfs directory, no '/')"
    return None


def _check_property_name(name: str) -> str | None:
    if not name or "=" in name or "\0" in name:
        return "is not a property name (no '=' or NUL)"
    return None


def _named_patterns(
    key: KeyPath, value: object, check_name: Callable[[str], str | None]
) -> list[tuple[str, Pattern]]:
    table = _table(key, value, '{ NAME = "glob" }')
    if not table:
        raise _Invalid(key, f"{_dotted(key)}: empty table; give at least one NAME = glob")
    out = []
    for name, glob in table.items():
        problem = check_name(name)
        if problem is not None:
            raise _Invalid((*key, name), f"{_dotted(key)}: {_show(name)} {problem}")
        out.append((name, _pattern((*key, name), glob)))
    return out


def _ids(key: KeyPath, value: object) -> dict[str, Pattern]:
    kind = key[-1]
    known = ID_KEYS[kind]
    example = (
        '{ vendor = "10c4", product = "ea60" }'
        if kind == "usb"
        else '{ vendor = "10de", device = "2204" }'
    )
    table = _table(key, value, example)
    if not table:
        raise _Invalid(key, f"{_dotted(key)}: empty table; give {', '.join(known)}")
    out = {}
    for name, glob in table.items():
        if name not in known:
            raise _unknown(key, name, known)
        hexadecimal = name in HEX_KEYS
        out[name] = _pattern(
            (*key, name),
            glob,
            normalize=normalize_hex if hexadecimal else None,
            check=_check_hex if hexadecimal else None,
        )
    return out


def _match_conditions(name: str, value: object) -> list[Condition]:
    """The condition(s) for one key of [rule.match]; ``env`` and ``attr`` give one per name."""
    key = ("match", name)
    if name in EVENT_KEYS:
        normalize = _devname_glob if name == "devname" else None
        return [EventField(name, _pattern(key, value, normalize=normalize))]
    if name == "driver":
        return [Driver(_pattern(key, value))]
    if name == "tag":
        return [Tag(_pattern(key, value))]
    if name == "env":
        return [Env(n, p) for n, p in _named_patterns(key, value, _check_property_name)]
    if name == "attr":
        return [Attr(n, p) for n, p in _named_patterns(key, value, _check_attribute_name)]
    if name == "attrs":
        return [Attrs(tuple(_named_patterns(key, value, _check_attribute_name)))]
    if name == "usb":
        usb = _ids(key, value)
        return [Usb(usb.get("vendor"), usb.get("product"), usb.get("serial"))]
    pci = _ids(key, value)
    return [Pci(pci.get("vendor"), pci.get("device"), pci.get("slot"))]


def _template(key: KeyPath, value: object, check: Callable[[Template], str | None]) -> Template:
    text = _string(key, value, "a string")
    try:
        template = Template.parse(text)
    except TemplateError as exc:
        raise _Invalid(key, f"{_dotted(key)}: {_show(text)}: {exc}") from None
    problem = check(template)
    if problem is not None:
        raise _Invalid(key, f"{_dotted(key)}: {_show(text)} {problem}")
    return template


def _ifname_template(template: Template) -> str | None:
    return check_ifname(template.skeleton(), partial=not template.is_literal)


def _mode(key: KeyPath, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        raise _Invalid(
            key,
            f'{_dotted(key)}: expected an octal string such as "0660", got integer {value} '
            "(TOML integers lose their base: quote it)",
        )
    text = _string(key, value, 'an octal string such as "0660"')
    if not _MODE.match(text):
        raise _Invalid(key, f'{_dotted(key)}: {_show(text)} is not an octal mode such as "0660"')
    mode = int(text, 8)
    if mode > 0o777:
        raise _Invalid(
            key,
            f"{_dotted(key)}: {_show(text)} sets setuid, setgid or sticky bits; "
            "a device node takes permission bits only (at most 0777)",
        )
    return mode


def _owner(key: KeyPath, value: object) -> Owner:
    what = "a user" if key[-1] == "owner" else "a group"
    expected = f"{what} name or number"
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = _string(key, value, expected)
        if not text.isascii() or not text.isdigit():
            if not _USER_NAME.match(text):
                raise _Invalid(key, f"{_dotted(key)}: {_show(text)} is not {expected}")
            return text
        number = int(text)
    if not 0 <= number <= _MAX_ID:
        raise _Invalid(key, f"{_dotted(key)}: {number} is not a valid id (0 to {_MAX_ID})")
    return number


def _access(key: KeyPath, value: object) -> Access:
    text = _string(key, value, 'a subset of "rwm" such as "rw"')
    try:
        return Access.parse(text)
    except ValueError:
        raise _Invalid(
            key, f'{_dotted(key)}: {_show(text)} is not a subset of "rwm" (such as "rw")'
        ) from None


def _uevent_mode(key: KeyPath, value: object) -> UeventMode:
    choices = ", ".join(m.value for m in UeventMode)
    text = _string(key, value, f"one of {choices}")
    try:
        return UeventMode(text)
    except ValueError:
        raise _Invalid(
            key, f"{_dotted(key)}: expected one of {choices}, got {_show(text)}"
        ) from None


def _target_texts(value: object) -> tuple[str, ...]:
    return _strings(("target",), value, 'a "RUNTIME:NAME" string such as "lxc:homeassistant"')


def _target(text: str) -> Target:
    try:
        return Target.parse(text)
    except TargetError as exc:
        raise _Invalid(("target",), f"target: {_show(text)}: {exc}") from None


@dataclass
class _RuleReader:
    """Reads one ``[[rule]]`` table, collecting every problem instead of stopping."""

    path: str
    locator: Locator
    index: int
    table: dict[str, object]

    def __post_init__(self) -> None:
        self.problems: list[_Invalid] = []
        name = self.table.get("name")
        self.label = (
            f"rule {_show(name)}"
            if isinstance(name, str) and _RULE_NAME.match(name)
            else f"rule #{self.index + 1}"
        )

    def errors(self) -> list[RuleError]:
        return [
            RuleError(
                self.path, self.locator.line_of(self.index, p.key), f"{self.label}: {p.message}"
            )
            for p in self.problems
        ]

    def attempt(self, parse: Callable[[], T]) -> T | None:
        try:
            return parse()
        except _Invalid as problem:
            self.problems.append(problem)
            return None

    def _targets(self, value: object) -> tuple[Target, ...] | None:
        """Every target, each bad one reported (not only the first)."""
        texts = self.attempt(lambda: _target_texts(value))
        if texts is None:
            return None
        parsed = [self.attempt(partial(_target, text)) for text in texts]
        good = [t for t in parsed if t is not None]
        return tuple(good) if len(good) == len(parsed) else None

    def missing(self, key: str, message: str) -> None:
        self.problems.append(_Invalid((), f"missing {key}: {message}"))

    def read(self) -> Rule | None:
        table = self.table
        for key in table:
            if key not in RULE_KEYS:
                self.problems.append(_unknown((), key, RULE_KEYS))
        name = self.attempt(lambda: self._name(table["name"])) if "name" in table else None
        if "name" not in table:
            self.missing("name", 'every rule needs a unique name = "..."')
        description = ""
        if "description" in table:
            description = (
                self.attempt(lambda: _string(("description",), table["description"], "a string"))
                or ""
            )
        targets = self._targets(table["target"]) if "target" in table else None
        if "target" not in table:
            self.missing(
                "target", 'give target = ["RUNTIME:NAME", ...] such as "lxc:homeassistant"'
            )
        conditions = self._conditions() if "match" in table else None
        if "match" not in table:
            self.missing("[rule.match]", "a rule needs at least one condition")
        device = self._device(table["device"]) if "device" in table else DeviceSpec()
        netdev = self._netdev(table["netdev"]) if "netdev" in table else NetdevSpec()
        if self.problems or name is None or targets is None or conditions is None:
            return None
        assert device is not None
        assert netdev is not None
        return Rule(
            name,
            targets,
            conditions,
            device=device,
            netdev=netdev,
            description=description,
            source=self.source(),
        )

    def source(self) -> Source:
        locator = self.locator
        return Source(
            self.path, locator.line_of(self.index), locator.line_of(self.index, ("name",))
        )

    def _name(self, value: object) -> str:
        text = _string(("name",), value, 'a string such as "zigbee-dongle"')
        if not _RULE_NAME.match(text):
            raise _Invalid(
                ("name",),
                f"name: {_show(text)} is not a rule name "
                "(1 to 128 letters, digits and _ . : @ + -)",
            )
        return text

    def _conditions(self) -> tuple[Condition, ...] | None:
        match = self.attempt(
            lambda: _table(("match",), self.table["match"], '{ subsystem = "tty" }')
        )
        if match is None:
            return None
        if not match:
            self.problems.append(
                _Invalid(
                    ("match",),
                    'match: no conditions; a rule needs at least one (subsystem = "*" '
                    "matches every device)",
                )
            )
            return None
        conditions: list[Condition] = []
        before = len(self.problems)
        for name, value in match.items():
            if name not in MATCH_KEYS:
                self.problems.append(_unknown(("match",), name, MATCH_KEYS))
                continue
            conditions += self.attempt(partial(_match_conditions, name, value)) or ()
        if len(self.problems) > before:
            return None
        return tuple(sorted(conditions, key=lambda c: c.order))

    def _device(self, value: object) -> DeviceSpec | None:
        table = self.attempt(lambda: _table(("device",), value, '{ path = "/dev/zigbee" }'))
        if table is None:
            return None
        before = len(self.problems)
        for key in table:
            if key not in DEVICE_KEYS:
                self.problems.append(_unknown(("device",), key, DEVICE_KEYS))

        def get(key: str, parse: Callable[[KeyPath, object], T], default: T) -> T:
            if key not in table:
                return default
            parsed = self.attempt(lambda: parse(("device", key), table[key]))
            return default if parsed is None else parsed

        spec = DeviceSpec(
            path=get("path", lambda k, v: _template(k, v, check_dev_template), None),
            mode=get("mode", _mode, None),
            owner=get("owner", _owner, ROOT),
            group=get("group", _owner, ROOT),
            access=get("access", _access, Access()),
            symlinks=get("symlinks", _symlinks, ()),
            uevent=get("uevent", _uevent_mode, UeventMode.AUTO),
        )
        return None if len(self.problems) > before else spec

    def _netdev(self, value: object) -> NetdevSpec | None:
        table = self.attempt(lambda: _table(("netdev",), value, '{ name = "wan0" }'))
        if table is None:
            return None
        before = len(self.problems)
        for key in table:
            if key not in NETDEV_KEYS:
                self.problems.append(_unknown(("netdev",), key, NETDEV_KEYS))
        name = None
        if "name" in table:
            name = self.attempt(
                lambda: _template(("netdev", "name"), table["name"], _ifname_template)
            )
        return None if len(self.problems) > before else NetdevSpec(name)


def _symlinks(key: KeyPath, value: object) -> tuple[Template, ...]:
    texts = _strings(key, value, 'a path relative to /dev such as "serial/by-id/{ID_SERIAL}"')
    return tuple(_template(key, text, check_dev_template) for text in texts)


def _syntax_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> RuleError:
    message = str(exc)
    found = _TOML_POSITION.search(message)
    if found is None:
        return RuleError(path, 1, f"invalid TOML: {message}")
    if found.group(1) is None:
        line = text.count("\n") + 1
        where = "at end of file"
    else:
        line = int(found.group(1))
        where = f"column {found.group(2)}"
    return RuleError(path, line, f"invalid TOML: {message[: found.start()]} ({where})")


Declared = tuple[str, Source]  # a rule name and where it is written


def check_unique_names(
    declared: Iterable[Declared], *, across_files_only: bool = False
) -> list[RuleError]:
    """A ``duplicate name`` error for every name an earlier rule already took.

    ``across_files_only`` skips duplicates within one file (already reported there).
    """
    seen: dict[str, Source] = {}
    errors = []
    for name, source in declared:
        first = seen.setdefault(name, source)
        if first is source or (across_files_only and first.path == source.path):
            continue
        errors.append(
            RuleError(
                source.path,
                source.name_line or source.line,
                f"rule {_show(name)}: duplicate name; first defined at {first}",
            )
        )
    return errors


def load_rules_text(text: str, path: str) -> list[Rule]:
    """Parse one rule file's text; raises ``RuleSetError`` with every problem found."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleSetError([_syntax_error(path, text, exc)]) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays/tables
        raise RuleSetError([RuleError(path, 1, "invalid TOML: nested too deeply")]) from None
    locator = Locator(text)
    errors: list[RuleError] = []
    for key in document:
        if key != "rule":
            errors.append(
                RuleError(
                    path,
                    locator.line_of(None, (key,)),
                    f"unknown top-level key {_show(key)}; rules are [[rule]] tables",
                )
            )
    tables = document.get("rule", [])
    if isinstance(tables, dict):
        errors.append(
            RuleError(
                path,
                locator.line_of(None, ("rule",)),
                "[rule] is a single table: write [[rule]] (an array of tables), one per rule",
            )
        )
        tables = []
    elif not isinstance(tables, list):
        errors.append(
            RuleError(
                path,
                locator.line_of(None, ("rule",)),
                f"rule: expected [[rule]] tables, {_got(tables)}",
            )
        )
        tables = []
    rules: list[Rule] = []
    # Names of every rule that has a valid one, broken or not: a duplicate is reported
    # in the same round as the other problems, not after they are fixed.
    declared: list[Declared] = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            errors.append(
                RuleError(
                    path,
                    locator.line_of(None, ("rule",)),
                    f"rule #{index + 1}: expected a [[rule]] table, {_got(table)}",
                )
            )
            continue
        reader = _RuleReader(path, locator, index, table)
        rule = reader.read()
        errors += reader.errors()
        if rule is not None:
            rules.append(rule)
        name = table.get("name")
        if isinstance(name, str) and _RULE_NAME.match(name):
            declared.append((name, reader.source()))
    errors += check_unique_names(declared)
    if errors:
        raise RuleSetError(sorted(errors, key=lambda e: e.line or 0), declared)
    return rules
