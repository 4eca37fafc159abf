"""The daemon's configuration file: TOML text in, a frozen ``Config`` out.

Pure like the rest of ``hotrelay.core``: the daemon reads ``/etc/hotrelay/hotrelay.toml``
(an absent or empty file means every default) and hands the text over. Every setting
has its own small parser and a message that names the key and what was expected there;
unknown keys are errors, never silently dropped. All problems of the file are reported
together as ``path:line: message`` (the same ``RuleError`` and line locator as the rule
files), and any problem rejects the whole file: on SIGHUP the daemon keeps the config it
has and logs why.

```toml
rules_dir = "/etc/hotrelay/rules.d"
state_dir = "/run/hotrelay"
socket = "/run/hotrelay/control.sock"
socket_group = "hotrelay"            # may use status, list and monitor
source = "auto"                      # auto | kernel | udev
udev_control = "/run/udev/control"   # udevd's control socket: its listener is udevd
rcvbuf = "64M"                       # or a number of bytes
heal_interval = 5                    # seconds; 0 turns self-healing off
revoke_on_exit = false
log_level = "info"                   # debug | info | warning | error
log_format = "auto"                  # auto | text | journal
metrics = "127.0.0.1:9477"           # absent: no metrics endpoint

[runtimes]
enabled = ["lxc", "docker"]          # default: all of them
lxc.paths = ["/var/lib/lxc"]
docker.socket = "/run/docker.sock"
```
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from hotrelay.core.containers import Runtime
from hotrelay.core.rules.errors import RuleError, RuleSetError

# The rule loader's value descriptions and TOML syntax-error translation, so that a
# config message reads exactly like a rule message ("got string "5"", "(column 3)").
from hotrelay.core.rules.loader import _got, _show, _syntax_error
from hotrelay.core.rules.locate import Locator

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RCVBUF",
    "DEFAULT_RULES_DIR",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE_DIR",
    "WATCHED_RUNTIMES",
    "Config",
    "ConfigError",
    "LogFormat",
    "LogLevel",
    "MetricsAddress",
    "RuntimesConfig",
    "SourceName",
    "load_config_text",
]

DEFAULT_CONFIG_PATH = "/etc/hotrelay/hotrelay.toml"
DEFAULT_RULES_DIR = "/etc/hotrelay/rules.d"
DEFAULT_STATE_DIR = "/run/hotrelay"
DEFAULT_SOCKET = "/run/hotrelay/control.sock"
DEFAULT_UDEV_CONTROL = "/run/udev/control"  # equal to hotrelay.daemon.source.UDEV_CONTROL
DEFAULT_RCVBUF = 64 * 1024 * 1024  # equal to hotrelay.daemon.source.DEFAULT_RCVBUF (tested)
DEFAULT_HEAL_INTERVAL = 5.0

SourceName = Literal["auto", "kernel", "udev"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "text", "journal"]
SOURCES: tuple[SourceName, ...] = ("auto", "kernel", "udev")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "journal")

# Runtimes with something to watch; pid: and cgroup: targets need no watcher.
WATCHED_RUNTIMES: tuple[Runtime, ...] = (
    Runtime.LXC,
    Runtime.INCUS,
    Runtime.LXD,
    Runtime.DOCKER,
    Runtime.PODMAN,
    Runtime.RUNC,
    Runtime.NSPAWN,
)

MIN_RCVBUF = 64 * 1024
# SO_RCVBUFFORCE takes an int and the kernel doubles it: stay well inside INT_MAX.
MAX_RCVBUF = 1024 * 1024 * 1024
MIN_HEAL_INTERVAL = 0.1
MAX_HEAL_INTERVAL = 86400.0
MAX_GID = 2**32 - 2  # (gid_t)-1 means "no change" to chown
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?\Z")
_SIZE = re.compile(r"(\d+)\s*([KMG]?)(?:i?B)?\Z", re.IGNORECASE)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

T = TypeVar("T")
KeyPath = tuple[str, ...]


class ConfigError(RuleSetError):
    """Every problem found in the config file, each a ``RuleError`` (``path:line: message``).

    A ``RuleSetError``, so that code reporting rule problems reports these the same way.
    """


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where the Prometheus endpoint listens: an explicit address, never "every interface"."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RuntimesConfig:
    """Which runtimes are watched, and where each one keeps its state or API socket."""

    enabled: tuple[Runtime, ...] = WATCHED_RUNTIMES
    lxc_paths: tuple[str, ...] = ("/var/lib/lxc",)
    docker_socket: str = "/run/docker.sock"
    podman_socket: str = "/run/podman/podman.sock"
    lxd_socket: str = "/var/snap/lxd/common/lxd/unix.socket"
    incus_socket: str = "/var/lib/incus/unix.socket"
    runc_roots: tuple[str, ...] = ("/run/runc",)
    nspawn_machines_dir: str = "/run/systemd/machines"


@dataclass(frozen=True, slots=True)
class Config:
    """The daemon's settings. Paths are absolute strings (the core does not touch pathlib)."""

    rules_dir: str = DEFAULT_RULES_DIR
    state_dir: str = DEFAULT_STATE_DIR
    socket: str = DEFAULT_SOCKET
    socket_group: str | int | None = None
    source: SourceName = "auto"
    udev_control: str = DEFAULT_UDEV_CONTROL
    rcvbuf: int = DEFAULT_RCVBUF
    heal_interval: float = DEFAULT_HEAL_INTERVAL  # 0: no self-healing pass
    revoke_on_exit: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    metrics: MetricsAddress | None = None
    runtimes: RuntimesConfig = field(default_factory=RuntimesConfig)


class _Invalid(Exception):
    """One bad value; the reader adds where it is written."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _dotted(key: KeyPath) -> str:
    return ".".join(key)


# Each value parser takes the key (for its message) and the TOML value.


def _path(key: KeyPath, value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f'{_dotted(key)}: expected an absolute path such as "/run/x", {_got(value)}')
    if not value.startswith("/"):
        raise _Invalid(f"{_dotted(key)}: {_show(value)} is not an absolute path")
    if "\0" in value:
        raise _Invalid(f"{_dotted(key)}: {_show(value)} contains a NUL character")
    return value


def _paths(key: KeyPath, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_path(key, value),)
    if not isinstance(value, list):
        raise _Invalid(
            f'{_dotted(key)}: expected an array of absolute paths such as ["/var/lib/lxc"], '
            f"{_got(value)}"
        )
    return tuple(_path(key, item) for item in value)


def _socket_path(key: KeyPath, value: object) -> str:
    path = _path(key, value)
    if path.endswith("/"):
        raise _Invalid(f"{_dotted(key)}: {_show(path)} names a directory, not a socket file")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_SOCKET_PATH:
        raise _Invalid(
            f"{_dotted(key)}: path is {size} bytes long; "
            f"a unix socket path is at most {MAX_SOCKET_PATH} bytes"
        )
    return path


def _group(key: KeyPath, value: object) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_GID:
            raise _Invalid(f"{_dotted(key)}: {value} is not a valid group id (0 to {MAX_GID})")
        return value
    if not isinstance(value, str):
        raise _Invalid(f'{_dotted(key)}: expected a group name such as "hotrelay", {_got(value)}')
    if value.isascii() and value.isdigit():
        return _group(key, int(value))
    if not _GROUP_NAME.match(value):
        raise _Invalid(f"{_dotted(key)}: {_show(value)} is not a group name or number")
    return value


def _choice(choices: Sequence[T]) -> Callable[[KeyPath, object], T]:
    def parse(key: KeyPath, value: object) -> T:
        listed = ", ".join(str(c) for c in choices)
        if not isinstance(value, str):
            raise _Invalid(f"{_dotted(key)}: expected one of {listed}, {_got(value)}")
        for choice in choices:
            if value == choice:
                return choice
        close = difflib.get_close_matches(value.lower(), [str(c) for c in choices], n=1)
        hint = f" (did you mean {_show(close[0])}?)" if close else ""
        raise _Invalid(f"{_dotted(key)}: expected one of {listed}, got {_show(value)}{hint}")

    return parse


def _size(key: KeyPath, value: object) -> int:
    expected = 'a size in bytes such as 67108864 or "64M"'
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        found = _SIZE.match(value.strip())
        if found is None:
            raise _Invalid(f'{_dotted(key)}: {_show(value)} is not a size such as "64M"')
        number = int(found.group(1)) * _UNITS[found.group(2).upper()]
    else:
        raise _Invalid(f"{_dotted(key)}: expected {expected}, {_got(value)}")
    if not MIN_RCVBUF <= number <= MAX_RCVBUF:
        raise _Invalid(
            f"{_dotted(key)}: {number} bytes is out of range; "
            f"expected {MIN_RCVBUF} (64K) to {MAX_RCVBUF} (1G)"
        )
    return number


def _seconds(key: KeyPath, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(
            f"{_dotted(key)}: expected a number of seconds such as 5 "
            f"(0 turns self-healing off), {_got(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"{_dotted(key)}: {_show(value)} is not a number of seconds")
    if value != 0 and not MIN_HEAL_INTERVAL <= value <= MAX_HEAL_INTERVAL:
        raise _Invalid(
            f"{_dotted(key)}: {_show(value)} is out of range; "
            f"expected 0 (off) or {MIN_HEAL_INTERVAL} to {MAX_HEAL_INTERVAL:.0f} seconds"
        )
    return float(value)


def _boolean(key: KeyPath, value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{_dotted(key)}: expected true or false, {_got(value)}")
    return value


def _metrics(key: KeyPath, value: object) -> MetricsAddress:
    example = '"127.0.0.1:9477"'
    if not isinstance(value, str):
        raise _Invalid(f"{_dotted(key)}: expected an address such as {example}, {_got(value)}")
    host, colon, port = value.rpartition(":")
    if not colon:
        raise _Invalid(f"{_dotted(key)}: {_show(value)} is not HOST:PORT such as {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{_dotted(key)}: {_show(host)} is not an IPv6 address") from None
    elif not host:
        raise _Invalid(
            f"{_dotted(key)}: {_show(value)} has no host; name the address to listen on, "
            f"such as {example} (metrics are never served on every interface by default)"
        )
    elif ":" in host:
        raise _Invalid(
            f"{_dotted(key)}: {_show(value)}: write an IPv6 address in brackets, "
            'such as "[::1]:9477"'
        )
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise _Invalid(
                    f"{_dotted(key)}: {_show(host)} is not an IP address or host name"
                ) from None
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise _Invalid(f"{_dotted(key)}: port {_show(port)} is not a number from 0 to 65535")
    return MetricsAddress(host, int(port))


def _runtime_names(key: KeyPath, value: object) -> tuple[Runtime, ...]:
    known = [r.value for r in WATCHED_RUNTIMES]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Invalid(
            f'{_dotted(key)}: expected an array of runtime names such as ["lxc", "docker"], '
            f"{_got(value)}"
        )
    enabled: list[Runtime] = []
    for item in value:
        if not isinstance(item, str):
            raise _Invalid(f"{_dotted(key)}: expected runtime names in the array, {_got(item)}")
        if item not in known:
            close = difflib.get_close_matches(item, known, n=1)
            hint = f" (did you mean {_show(close[0])}?)" if close else ""
            raise _Invalid(
                f"{_dotted(key)}: {_show(item)} is not a runtime{hint}; "
                f"expected some of {', '.join(sorted(known))}"
            )
        runtime = Runtime(item)
        if runtime in enabled:
            raise _Invalid(f"{_dotted(key)}: {_show(item)} is listed twice")
        enabled.append(runtime)
    return tuple(enabled)


class _Reader:
    """Reads tables against their schema, collecting every problem with its line."""

    def __init__(self, path: str, locator: Locator) -> None:
        self.path = path
        self.locator = locator
        self.errors: list[RuleError] = []

    def fail(self, key: KeyPath, message: str) -> None:
        line = self.locator.line_of(None, key)
        if key[:1] == ("rule",) and self.locator.rule_lines:
            line = self.locator.rule_lines[0]  # the locator files [[rule]] apart
        self.errors.append(RuleError(self.path, line, message))

    def table(
        self,
        where: KeyPath,
        value: object,
        schema: Mapping[str, Callable[[KeyPath, object], object]],
    ) -> dict[str, Any] | None:
        """The parsed values of the keys that are valid; None if ``value`` is no table."""
        if not isinstance(value, dict):
            header = "[" + _dotted(where) + "]"
            self.fail(where, f"{_dotted(where)}: expected a table such as {header}, {_got(value)}")
            return None
        parsed: dict[str, Any] = {}
        for name, item in value.items():
            key = (*where, name)
            parse = schema.get(name)
            if parse is None:
                self.fail(key, _unknown(where, name, list(schema)))
                continue
            try:
                parsed[name] = parse(key, item)
            except _Invalid as problem:
                self.fail(key, problem.message)
        return parsed

    def subtable(
        self, schema: Mapping[str, Callable[[KeyPath, object], object]]
    ) -> Callable[[KeyPath, object], dict[str, Any]]:
        """A value parser for a nested table: its problems are recorded, not raised."""

        def parse(key: KeyPath, value: object) -> dict[str, Any]:
            return self.table(key, value, schema) or {}

        return parse


def _unknown(where: KeyPath, name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {_show(close[0])}?)" if close else ""
    if not where and name == "rule":
        hint = " (rules go in files under rules_dir, not in the daemon's config)"
    prefix = f"{_dotted(where)}: " if where else ""
    return f"{prefix}unknown key {_show(name)}{hint}; expected one of {', '.join(sorted(known))}"


def _runtimes(reader: _Reader, key: KeyPath, value: object) -> RuntimesConfig:
    def api_socket() -> Callable[[KeyPath, object], dict[str, Any]]:
        return reader.subtable({"socket": _socket_path})

    schema: dict[str, Callable[[KeyPath, object], object]] = {
        "enabled": _runtime_names,
        "lxc": reader.subtable({"paths": _paths}),
        "docker": api_socket(),
        "podman": api_socket(),
        "lxd": api_socket(),
        "incus": api_socket(),
        "runc": reader.subtable({"roots": _paths}),
        "nspawn": reader.subtable({"machines_dir": _path}),
    }
    table = reader.table(key, value, schema) or {}
    defaults = RuntimesConfig()

    def get(name: str, setting: str, default: T) -> T:
        return cast(T, table.get(name, {}).get(setting, default))

    return RuntimesConfig(
        enabled=table.get("enabled", defaults.enabled),
        lxc_paths=get("lxc", "paths", defaults.lxc_paths),
        docker_socket=get("docker", "socket", defaults.docker_socket),
        podman_socket=get("podman", "socket", defaults.podman_socket),
        lxd_socket=get("lxd", "socket", defaults.lxd_socket),
        incus_socket=get("incus", "socket", defaults.incus_socket),
        runc_roots=get("runc", "roots", defaults.runc_roots),
        nspawn_machines_dir=get("nspawn", "machines_dir", defaults.nspawn_machines_dir),
    )


def load_config_text(text: str, path: str = DEFAULT_CONFIG_PATH) -> Config:
    """Parse the daemon's config file text; raises ``ConfigError`` with every problem.

    An empty text (the daemon passes one for an absent file) gives every default.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_error(path, text, exc)]) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays/tables
        raise ConfigError([RuleError(path, 1, "invalid TOML: nested too deeply")]) from None
    reader = _Reader(path, Locator(text))
    schema: dict[str, Callable[[KeyPath, object], object]] = {
        "rules_dir": _path,
        "state_dir": _path,
        "socket": _socket_path,
        "socket_group": _group,
        "source": _choice(SOURCES),
        "udev_control": _socket_path,
        "rcvbuf": _size,
        "heal_interval": _seconds,
        "revoke_on_exit": _boolean,
        "log_level": _choice(LOG_LEVELS),
        "log_format": _choice(LOG_FORMATS),
        "metrics": _metrics,
        "runtimes": lambda key, value: _runtimes(reader, key, value),
    }
    values = reader.table((), document, schema)
    if reader.errors:
        raise ConfigError(sorted(reader.errors, key=lambda e: e.line or 0))
    assert values is not None  # tomllib always gives a table
    return Config(**values)
