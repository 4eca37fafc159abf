"""Templates such as ``serial/by-id/{ID_SERIAL}``, and the /dev confinement of paths.

``{NAME}`` with an UPPERCASE name is the event's property of that name; a lowercase
name is a built-in (``kernel``, ``devname``, ``number``, ``major``, ``minor``,
``subsystem``); ``{{`` and ``}}`` are literal braces. Syntax and unknown built-ins are
errors when the rule loads; a property the event does not carry is an error when the
template is expanded, because only the event can tell.

Every path a rule produces must stay inside the container's /dev: an absolute path
outside /dev or a ``..`` component is refused at load time when the literal text
shows it, and every expanded path is checked again, because a property value can
carry ``/`` or ``..`` too.

A value expanded into a /dev path is made safe the way udev makes ``$env{...}`` safe
in ``SYMLINK``: a property comes from the device (a USB product string is whatever
the device says), and the links end up space-separated in the DEVLINKS of the uevent
replayed inside, so "Kbd /dev/zigbee" would tell libudev in the container that
/dev/zigbee is this keyboard. Runs of whitespace become one ``_`` (udev's
``util_replace_whitespace``), and every character other than ASCII letters and
digits, ``#+-.:=@_``, ``/``, ``\\x`` escapes and printable non-ASCII becomes ``_``
(``util_replace_chars`` with ``/`` allowed). ``/`` stays, as in udev, so a value may
make directories, but no path may go more than ``MAX_DEV_DEPTH`` levels below /dev.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hotrelay.core.uevent import Uevent

__all__ = [
    "BUILTINS",
    "IFNAMSIZ",
    "MAX_DEV_DEPTH",
    "Template",
    "TemplateError",
    "check_dev_template",
    "check_ifname",
    "confine_to_dev",
    "sanitize_path_value",
]

# Bytes in an interface name, without the NUL (IFNAMSIZ - 1 in the kernel).
IFNAMSIZ = 15
_PROPERTY = re.compile(r"[A-Z_][A-Za-z0-9_]*\Z")
_BUILTIN = re.compile(r"[a-z_]+\Z")
_TRAILING_DIGITS = re.compile(r"[0-9]+\Z")
_HOLE = "\0"  # stands for an expansion when checking a template's literal text
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Components of a path below /dev: /dev/serial/by-id/NAME is 3, /dev/bus/usb/001/004 is 4.
MAX_DEV_DEPTH = 8
_WHITESPACE_RUN = re.compile(r"\s+")
# What udev keeps: ASCII letters and digits, "#+-.:=@_", here "/" too, and "\x" escapes.
_UNSAFE_ASCII = re.compile(r"\\x|[^0-9A-Za-z#+\-.:=@_/]")


def _replace_unsafe(found: re.Match[str]) -> str:
    char = found.group()
    if char == "\\x" or (char > "\x7f" and char.isprintable()):
        return char  # a hex escape, or printable non-ASCII (udev keeps valid UTF-8)
    return "_"


def sanitize_path_value(value: str) -> str:
    """A template value made safe for a /dev path, as udev makes ``$env{}`` safe for
    ``SYMLINK``: no whitespace (runs become one ``_``, none at either end), no control
    or shell characters (``_`` each). ``/`` is kept; the depth is checked on the path."""
    value = _WHITESPACE_RUN.sub("_", value.strip())
    return _UNSAFE_ASCII.sub(_replace_unsafe, value)


class TemplateError(ValueError):
    """A template that is malformed, or cannot be expanded for an event."""


def _devname(event: Uevent) -> str | None:
    node = event.node
    if node is None:
        return None
    return node[len("/dev/") :] if node.startswith("/dev/") else node.lstrip("/")


def _number(event: Uevent) -> str | None:
    found = _TRAILING_DIGITS.search(event.sysname)
    return found.group() if found else None


def _int_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


BUILTINS: Mapping[str, Callable[[Uevent], str | None]] = {
    "devname": _devname,
    "kernel": lambda event: event.sysname,
    "major": lambda event: _int_or_none(event.major),
    "minor": lambda event: _int_or_none(event.minor),
    "number": _number,
    "subsystem": lambda event: event.subsystem,
}

_Part = tuple[bool, str]  # (is a name, literal text or name)


def _parse(text: str) -> tuple[_Part, ...]:
    parts: list[_Part] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "{}" and text[i + 1 : i + 2] == char:
            literal.append(char)
            i += 2
            continue
        if char == "}":
            raise TemplateError(f"unmatched '}}' at position {i + 1} (write '}}}}' for a brace)")
        if char != "{":
            literal.append(char)
            i += 1
            continue
        end = text.find("}", i + 1)
        if end < 0:
            raise TemplateError(f"unterminated '{{' at position {i + 1} (write '{{{{' for a brace)")
        name = text[i + 1 : end]
        if _BUILTIN.match(name):
            if name not in BUILTINS:
                raise TemplateError(
                    f"unknown template name {{{name}}}: properties are UPPERCASE such as "
                    f"{{ID_SERIAL}}; built-ins are "
                    + ", ".join(f"{{{b}}}" for b in sorted(BUILTINS))
                )
        elif not _PROPERTY.match(name):
            raise TemplateError(
                f"bad template name {{{name}}} at position {i + 1}: expected a property "
                "such as {ID_SERIAL} or a built-in such as {kernel}"
            )
        if literal:
            parts.append((False, "".join(literal)))
            literal = []
        parts.append((True, name))
        i = end + 1
    if literal:
        parts.append((False, "".join(literal)))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template; ``text`` is what the rule said."""

    text: str
    parts: tuple[_Part, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        return cls(text, _parse(text))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(value for is_name, value in self.parts if is_name)

    @property
    def is_literal(self) -> bool:
        return not self.names

    def skeleton(self) -> str:
        """The literal text with each expansion replaced by a NUL, for load-time checks."""
        return "".join(_HOLE if is_name else value for is_name, value in self.parts)

    def expand(self, event: Uevent) -> str:
        """The text with every name replaced by the event's value, as it is."""
        return self._expand(event, None)

    def expand_path(self, event: Uevent) -> str:
        """For a /dev path: each value made safe first (``sanitize_path_value``)."""
        return self._expand(event, sanitize_path_value)

    def _expand(self, event: Uevent, clean: Callable[[str], str] | None) -> str:
        out: list[str] = []
        for is_name, value in self.parts:
            if not is_name:
                out.append(value)
                continue
            builtin = BUILTINS.get(value)
            expanded = builtin(event) if builtin is not None else event.get(value)
            if expanded is None:
                what = "built-in" if builtin is not None else "property"
                raise TemplateError(
                    f"{_quote(self.text)}: the event for {event.devpath} has no {what} {value}"
                )
            out.append(expanded if clean is None else clean(expanded))
        return "".join(out)


def check_dev_template(template: Template) -> str | None:
    """What is unsafe in a /dev path template's literal text, or None if nothing shows."""
    skeleton = template.skeleton()
    literal = skeleton.replace(_HOLE, "")
    if _CONTROL.search(literal):
        return "must not contain control characters"
    if any(char.isspace() for char in literal):
        return "must not contain whitespace (DEVLINKS separates links with spaces)"
    if skeleton.startswith("/") and not skeleton.startswith("/dev/"):
        return "must be under /dev (start it with /dev/, or make it relative to /dev)"
    for component in skeleton.split("/"):
        if component in ("..", "."):
            return f"must not contain a {component!r} component"
    if skeleton in ("/dev/", ""):
        return "names no file under /dev"
    depth = len([c for c in skeleton.removeprefix("/dev/").split("/") if c.replace(_HOLE, "")])
    if depth > MAX_DEV_DEPTH:
        return f"is {depth} levels below /dev; at most {MAX_DEV_DEPTH} are allowed"
    return None


def confine_to_dev(path: str) -> str:
    """An expanded path made absolute under /dev, or TemplateError if it would leave /dev,
    hold whitespace (it would split DEVLINKS) or go deeper than ``MAX_DEV_DEPTH``.

    Relative paths are relative to /dev; repeated slashes collapse.
    """
    shown = _quote(path)
    if _CONTROL.search(path):
        raise TemplateError(f"{shown} contains control characters")
    if any(char.isspace() for char in path):
        raise TemplateError(f"{shown} contains whitespace")
    relative = path
    if path.startswith("/"):
        if not path.startswith("/dev/"):
            raise TemplateError(f"{shown} is outside /dev")
        relative = path[len("/dev/") :]
    components = [c for c in relative.split("/") if c]
    for component in components:
        if component in ("..", "."):
            raise TemplateError(f"{shown} has a {component!r} component")
    if not components:
        raise TemplateError(f"{shown} names no file under /dev")
    if len(components) > MAX_DEV_DEPTH:
        raise TemplateError(
            f"{shown} is {len(components)} levels below /dev; at most {MAX_DEV_DEPTH} are allowed"
        )
    return "/dev/" + "/".join(components)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_BAD_IFNAME = re.compile(r"[/:\s\x00-\x1f\x7f]")


def check_ifname(name: str, *, partial: bool = False) -> str | None:
    """Why ``name`` is not a valid interface name (the kernel's dev_valid_name), or None.

    The answer completes a sentence starting with the name. With ``partial`` the name
    is a template's skeleton: only its literal characters and length are checked.
    """
    literal = name.replace(_HOLE, "")
    found = _BAD_IFNAME.search(literal)
    if found:
        return f"must not contain {json.dumps(found.group())} (not allowed in interface names)"
    if len(literal.encode()) > IFNAMSIZ:
        return f"is longer than {IFNAMSIZ} bytes, the limit for an interface name"
    if not partial and (not name or name in (".", "..")):
        return "is not a valid interface name"
    return None
