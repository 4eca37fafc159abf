"""CLI verbs that talk to the running daemon over its control socket.

``add_control_verbs(verbs)`` adds ``status``, ``list``, ``attach``, ``detach``, ``reload``
and ``refresh`` to the ``hotrelay`` parser; ``add_daemon_monitor_options(parser)`` adds
``--daemon`` to ``hotrelay monitor`` (then call ``run_daemon_monitor`` when it is set).
Each verb takes ``--socket PATH`` (default: ``socket`` from /etc/hotrelay/hotrelay.toml,
else /run/hotrelay/control.sock) and ``--json`` (exactly the daemon's result, otherwise
a table for people). Errors are ``HotrelayError``s; ``hotrelay.cli.main`` prints them and
maps them to exit codes (3: the daemon is not running, 2: permission denied).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from hotrelay.control.client import ControlClient, ControlError
from hotrelay.core.config import DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, ConfigError, load_config_text

__all__ = [
    "add_control_verbs",
    "add_daemon_monitor_options",
    "default_socket",
    "render",
    "run_control_verb",
    "run_daemon_monitor",
]

# Columns shown first, in this order, when a table has them; the rest follow as they come.
_PREFERRED_COLUMNS = ("runtime", "name", "container", "device", "path", "pid", "since")


def default_socket(config_path: Path = Path(DEFAULT_CONFIG_PATH)) -> Path:
    """The socket the daemon listens on, as far as this user can tell.

    A config this user cannot read or parse gives the default: the daemon checks the
    config, the CLI only wants to find the socket.
    """
    try:
        text = config_path.read_text(encoding="utf-8")
        return Path(load_config_text(text, str(config_path)).socket)
    except (OSError, UnicodeDecodeError, ConfigError):
        return Path(DEFAULT_SOCKET)


def _socket(args: argparse.Namespace) -> Path:
    path: Path | None = args.socket
    return path if path is not None else default_socket()


# Rendering results for people.


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value]
    return " ".join(shown[:2]) or "0s"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "since" and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, sort_keys=True)


def _table(rows: Sequence[dict[str, Any]], indent: str = "") -> list[str]:
    columns: list[str] = [c for c in _PREFERRED_COLUMNS if any(c in row for row in rows)]
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return indent + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line([c.upper() for c in columns]), *(line(r) for r in cells)]


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _mapping(data: dict[str, Any], indent: str = "") -> list[str]:
    out: list[str] = []
    plain = {k: v for k, v in data.items() if _scalar(v)}
    width = max((len(k) for k in plain), default=0)
    for key, value in data.items():
        label = key.replace("_", " ")
        if key == "uptime" and isinstance(value, int | float) and not isinstance(value, bool):
            out.append(f"{indent}{label.ljust(width)}  {_duration(value)}")
        elif _scalar(value):
            out.append(f"{indent}{label.ljust(width)}  {_cell(key, value)}")
        elif isinstance(value, dict):
            out.append(f"{indent}{label}:")
            out += _mapping(value, indent + "  ") if value else [f"{indent}  (none)"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(f"{indent}{label} ({len(value)}):")
            out += _table(value, indent + "  ")
        elif isinstance(value, list):
            out.append(f"{indent}{label} ({len(value)}):")
            out += [f"{indent}  {_cell(key, item)}" for item in value] or [f"{indent}  (none)"]
        else:
            out.append(f"{indent}{label}  {_cell(key, value)}")
    return out


def render(verb: str, result: Any) -> str:
    """The daemon's result for people: tables for lists of records, aligned key/values."""
    if verb == "list" and isinstance(result, list):
        if not result:
            return "no grants"
        if all(isinstance(row, dict) for row in result):
            return "\n".join(_table(result))
    if isinstance(result, dict):
        return "\n".join(_mapping(result)) if result else "ok"
    if result is None:
        return "ok"
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        return "\n".join(_table(result))
    return _cell(verb, result)


# Verbs.


def run_control_verb(verb: str, args: argparse.Namespace, out: TextIO) -> int:
    """Send ``verb`` with the arguments the parser collected and print the result."""
    request_args: dict[str, Any] = {}
    if verb in ("attach", "detach"):
        request_args = {"target": args.target, "device": args.device}
    if verb == "attach":
        request_args.update(path=args.path, mode=args.mode, owner=args.owner, group=args.group)
    if verb == "refresh":
        request_args = {"runtime": args.runtime, "name": args.name}
    try:
        with ControlClient(_socket(args)) as client:
            result = client.request(verb, **request_args)
    except ControlError as exc:
        if not args.json:
            raise
        # A program asked for JSON: it gets JSON on failure too (and exit status 1).
        failure = {"ok": False, "error": str(exc), "code": exc.code}
        out.write(json.dumps(failure, indent=2) + "\n")
        return exc.exit_code
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        out.write(render(verb, result) + "\n")
    return 0


def _verb(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return run_control_verb(verb, args, sys.stdout)

    return run


def _id(text: str) -> str | int:
    """A user or group given on the command line: digits are an id, anything else a name."""
    return int(text) if text.isascii() and text.isdigit() else text


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the daemon's control socket (default: socket in "
        f"{DEFAULT_CONFIG_PATH}, else {DEFAULT_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's result as JSON")


def add_control_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = verbs.add_parser(
        "status",
        help="the running daemon: uptime, event source, counters, containers, rule files",
        description="Ask the running daemon how it is doing.",
    )
    listing = verbs.add_parser(
        "list",
        help="the devices granted now: container, device, path, since",
        description="List every grant the daemon holds, from rules and from attach.",
    )
    attach = verbs.add_parser(
        "attach",
        help="grant a device to a running container now (kept until detach)",
        description="Grant DEVICE to the running container TARGET, like lxc-device but "
        "for any runtime: device cgroup, node and uevent. The grant is kept in the "
        "ledger and re-applied when the container restarts, until detach.",
    )
    attach.add_argument("target", metavar="TARGET", help="RUNTIME:NAME, such as lxc:homeassistant")
    attach.add_argument(
        "device",
        metavar="DEVICE",
        help="/dev/NODE (a symlink to it too), a /sys/... device that has a node, or "
        "/sys/class/net/IFACE",
    )
    attach.add_argument("--path", metavar="P", help="node path in the container (default: same)")
    attach.add_argument("--mode", metavar="M", help='node mode, octal, such as "0660"')
    attach.add_argument("--owner", type=_id, metavar="O", help="user name or id in the container")
    attach.add_argument("--group", type=_id, metavar="G", help="group name or id in the container")
    detach = verbs.add_parser(
        "detach",
        help="undo an attach",
        description="Revoke a device granted with attach, and remove its node.",
    )
    detach.add_argument("target", metavar="TARGET", help="RUNTIME:NAME, such as lxc:homeassistant")
    detach.add_argument("device", metavar="DEVICE", help="/dev/NODE or /sys/... device path")
    reload = verbs.add_parser(
        "reload",
        help="re-read config and rules (like SIGHUP), reporting any problem",
        description="Re-read the config and the rules. If anything is invalid the daemon "
        "keeps the old ones and this exits 1 with the path:line: messages.",
    )
    refresh = verbs.add_parser(
        "refresh",
        help="tell the daemon a container started or stopped (for runtime hooks)",
        description="Ask the daemon to look at one container now, granting what its rules "
        "want or cleaning up after it. The LXC hook calls this.",
    )
    refresh.add_argument("runtime", metavar="RUNTIME", help="lxc, docker, ...")
    refresh.add_argument("name", metavar="NAME", help="the container's name")
    parsers = {
        "status": status,
        "list": listing,
        "attach": attach,
        "detach": detach,
        "reload": reload,
        "refresh": refresh,
    }
    for verb, parser in parsers.items():
        _common(parser)
        parser.set_defaults(func=_verb(verb))


# hotrelay monitor --daemon


def add_daemon_monitor_options(monitor: argparse.ArgumentParser) -> None:
    """``hotrelay monitor --daemon``: the daemon's own feed (events with their verdicts,
    and actions) instead of listening to netlink directly."""
    monitor.add_argument(
        "--daemon",
        action="store_true",
        help="show what the running daemon hears and does (through its control socket)",
    )
    monitor.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="with --daemon: the daemon's control socket",
    )


def format_monitor_event(event: dict[str, Any]) -> str:
    kind = str(event.get("type", "event"))
    details = " ".join(
        f"{key}={_cell(key, value)}" for key, value in event.items() if key != "type"
    )
    return f"{kind.upper():<8} {details}".rstrip()


def run_daemon_monitor(args: argparse.Namespace, out: TextIO) -> int:
    """Stream the daemon's feed until it ends, ``--count`` events, or Ctrl-C."""
    count: int | None = getattr(args, "count", None)
    seen = 0
    with ControlClient(_socket(args)) as client:
        for event in client.stream("monitor"):
            if args.json:
                out.write(json.dumps(event) + "\n")
            else:
                out.write(format_monitor_event(event) + "\n")
            out.flush()
            seen += 1
            if count is not None and seen >= count:
                return 0
    # The stream ends only when the daemon closes it: it stopped (or restarted).
    print(
        f"hotrelay monitor: the daemon closed the stream after {seen} event(s) (did it stop?)",
        file=sys.stderr,
    )
    return 1
