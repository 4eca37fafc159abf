"""The rule verbs: ``check``, ``explain`` and ``simulate``. Nothing here changes the system.

``check`` validates rule files. ``explain`` shows, for a device present on this host,
each rule's verdict (matched, or the first condition that failed and the value seen)
and the targets that would receive it. ``simulate`` replays a captured uevent through
the rules and prints the plan of actions that would run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from hotrelay.core.containers import ContainerRef
from hotrelay.core.plan import Action, action_to_dict, plan_for
from hotrelay.core.relay import Relay
from hotrelay.core.rules import Rule, RuleSet, RuleSetError, Verdict
from hotrelay.core.uevent import Uevent, UeventParseError, Wire, parse
from hotrelay.errors import HotrelayError
from hotrelay.rules_files import DEFAULT_RULES_DIR, load_rules
from hotrelay.sysfs import SysfsDevice, resolve_device

__all__ = [
    "read_uevent_file",
    "run_check",
    "run_explain",
    "run_simulate",
]


class RulesInvalid(HotrelayError):
    """The rules did not load; the messages were already printed."""


def _load(paths: Sequence[Path], err: TextIO) -> RuleSet:
    try:
        return load_rules(paths)
    except RuleSetError as exc:
        for error in exc.errors:
            print(error, file=err)
        raise RulesInvalid(f"{len(exc.errors)} error(s) in the rules; nothing was loaded") from None


def run_check(paths: Sequence[str], out: TextIO, err: TextIO, *, as_json: bool = False) -> int:
    """Print every problem as ``path:line: message``; 0 if none, 1 otherwise."""
    targets = [Path(p) for p in paths] or [DEFAULT_RULES_DIR]
    try:
        rules = load_rules(targets)
    except RuleSetError as exc:
        count = len(exc.errors)
        if as_json:
            errors = [{"path": e.path, "line": e.line, "message": e.message} for e in exc.errors]
            print(json.dumps({"ok": False, "errors": errors}, indent=2), file=out)
            return 1
        for error in exc.errors:
            print(error, file=out)
        print(f"hotrelay: {count} error{'s' if count != 1 else ''}", file=err)
        return 1
    stats = rules.index.stats()
    count, files = len(rules), len(rules.files)
    if as_json:
        report = {
            "ok": True,
            "rules": count,
            "files": [str(f) for f in rules.files],
            "indexed": count - stats["scanned"],
            "scanned": stats["scanned"],
            "errors": [],
        }
        print(json.dumps(report, indent=2), file=out)
        return 0
    # "scanned" rules have no exact value to be indexed by: they cost time on every
    # event of their subsystem (or every event), so an operator may want to know.
    print(
        f"{', '.join(str(t) for t in targets)}: {count} rule{'s' if count != 1 else ''} in "
        f"{files} file{'s' if files != 1 else ''}, ok ({count - stats['scanned']} indexed, "
        f"{stats['scanned']} scanned)",
        file=out,
    )
    return 0


def _targets(rules: Sequence[Rule]) -> list[str]:
    seen: dict[str, None] = {}
    for rule in rules:
        for target in rule.targets:
            seen.setdefault(str(target), None)
    return list(seen)


def _device_json(device: SysfsDevice, event: Uevent) -> dict[str, Any]:
    return {
        "syspath": str(device.path),
        "devpath": event.devpath,
        "subsystem": event.subsystem,
        "devtype": event.devtype,
        "kernel": event.sysname,
        "devname": event.node,
        "major": event.major,
        "minor": event.minor,
        "driver": device.driver,
    }


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "name": verdict.rule.name,
        "source": str(verdict.rule.source),
        "matched": verdict.matched,
        "failure": verdict.failure,
        "targets": [str(t) for t in verdict.rule.targets],
    }


def run_explain(
    device_spec: str,
    rules_dir: Path,
    sysfs: Path,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    *,
    socket: Path | None = None,
    config: Path | None = None,
) -> int:
    """Each rule's verdict for one present device, and which running containers would
    receive it; 0 whether or not anything matched."""
    from hotrelay.receivers import resolve_receivers

    device = resolve_device(device_spec, sysfs)
    rules = _load([rules_dir], err)
    event = device.to_uevent("add")
    verdicts = rules.explain(event, device)
    matched = [v.rule for v in verdicts if v.matched]
    wanted = list(dict.fromkeys(t for r in matched for t in r.targets))
    via, receivers = (
        resolve_receivers(wanted, socket=socket, config=config) if wanted else ("none", [])
    )
    if as_json:
        report = {
            "device": _device_json(device, event),
            "rules_dir": str(rules_dir),
            "rules": [_verdict_json(v) for v in verdicts],
            "matched": [r.name for r in matched],
            "targets": _targets(matched),
            "containers_resolved": via,
            "receivers": [r.to_json() for r in receivers],
        }
        print(json.dumps(report, indent=2), file=out)
        return 0
    node = (
        f", node {event.node} ({'b' if event.subsystem == 'block' else 'c'} "
        f"{event.major}:{event.minor})"
        if event.node and event.major is not None
        else ""
    )
    print(f"device {event.devpath}", file=out)
    print(
        f"  subsystem {event.subsystem}, devtype {event.devtype or '-'}, kernel {event.sysname}"
        f"{node}, driver {device.driver or '-'}",
        file=out,
    )
    print(f"rules {rules_dir}: {len(rules)} rule{'s' if len(rules) != 1 else ''}", file=out)
    for verdict in verdicts:
        rule = verdict.rule
        if verdict.matched:
            targets = ", ".join(str(t) for t in rule.targets)
            print(f"  [match] {rule.name} ({rule.source}) -> {targets}", file=out)
        else:
            print(f"  [no]    {rule.name} ({rule.source}): {verdict.failure}", file=out)
    if matched:
        asked = "the running daemon" if via == "daemon" else "the runtimes"
        print(f"would go to (asked {asked}):", file=out)
        for receiver in receivers:
            if receiver.containers:
                print(f"  {receiver.target} -> {', '.join(receiver.containers)}", file=out)
            else:
                print(f"  {receiver.target} -> nothing: {receiver.why_none}", file=out)
    else:
        print("no rule matches: the device stays on the host", file=out)
    return 0


_MONITOR_HEADER = re.compile(r"^(KERNEL|UDEV)\s*\[[^\]]*\]\s")


def _parse_json(text: str, name: str) -> Uevent:
    """The first event in ``hotrelay monitor --json`` output (one object a line)."""
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise HotrelayError(f"{name}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("overflow"):
            continue
        props = obj.get("properties")
        if not isinstance(props, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in props.items()
        ):
            raise HotrelayError(f"{name}:{lineno}: a monitor event has a 'properties' object")
        wire = Wire.UDEV if obj.get("wire") == "udev" else Wire.KERNEL
        try:
            return Uevent.from_properties(props, wire)
        except UeventParseError as exc:
            raise HotrelayError(f"{name}:{lineno}: {exc}") from None
    raise HotrelayError(f"{name}: no event in it")


def _parse_text(data: bytes, name: str) -> Uevent:
    """``KEY=VALUE`` lines: ``udevadm info --query=property``, ``udevadm info`` (``E:``
    lines), ``hotrelay monitor -p`` or ``udevadm monitor -p`` (the first event), or
    ``hotrelay monitor --json`` (the first event).

    ``udevadm info``'s other ``X: ...`` lines and ``#`` comments are skipped.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HotrelayError(f"{name}: not a uevent (neither wire format nor UTF-8 text)") from exc
    if text.lstrip().startswith("{"):
        return _parse_json(text, name)
    props: dict[str, str] = {}
    wire: Wire | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = _MONITOR_HEADER.match(line)
        if header:
            if props:
                break  # the next event of a monitor capture: simulate takes the first
            wire = Wire.UDEV if header[1] == "UDEV" else Wire.KERNEL
            continue
        if line.startswith(("monitor will print", "KERNEL - ", "UDEV - ")):
            continue  # udevadm monitor's banner
        if line.startswith("E: "):
            line = line[3:]
        elif len(line) > 2 and line[1] == ":" and line[0].isupper() and line[2] == " ":
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise HotrelayError(f"{name}:{lineno}: expected KEY=VALUE, got {raw[:60]!r}")
        props[key] = value
    if wire is None:
        # udevd adds USEC_INITIALIZED to every event it processed: that is its wire.
        wire = Wire.UDEV if "USEC_INITIALIZED" in props else Wire.KERNEL
    try:
        return Uevent.from_properties(props, wire)
    except UeventParseError as exc:
        raise HotrelayError(f"{name}: {exc}") from None


def read_uevent_file(path: Path) -> Uevent:
    """A captured uevent: kernel or libudev wire bytes, or a KEY=VALUE text file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HotrelayError(f"{path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        try:
            return parse(data)
        except UeventParseError as exc:
            raise HotrelayError(f"{path}: {exc}") from None
    return _parse_text(data, str(path))


def _relay_plan(
    rules: RuleSet, event: Uevent, device: SysfsDevice | None, containers: list[ContainerRef]
) -> list[Action]:
    """What the daemon's relay would do for an add (or change) of this device, into
    these running containers: the same planner, grant sharing and container-side
    paths as the daemon, with nothing carried out."""
    relay = Relay(rules)
    for container in containers:
        relay.container_started(container)
    relay.device_event(event, device)
    bindings = sorted(relay.desired.values(), key=lambda b: str(b.key))
    return [action for binding in bindings for action in binding.actions]


def run_simulate(
    uevent_file: Path,
    rules_dir: Path,
    sysfs: Path,
    as_json: bool,
    out: TextIO,
    err: TextIO,
    *,
    socket: Path | None = None,
    config: Path | None = None,
) -> int:
    """The plan for one captured uevent; changes nothing."""
    from hotrelay.receivers import resolve_containers

    event = read_uevent_file(uevent_file)
    rules = _load([rules_dir], err)
    # Attributes come from this host's sysfs when the device is here; a capture from
    # elsewhere is matched on its properties alone (usb falls back to ID_* properties).
    syspath = sysfs / event.devpath.lstrip("/")
    device = None
    if (syspath / "uevent").is_file():
        device = SysfsDevice.from_syspath(syspath, sysfs)
    matched = rules.match(event, device)
    resolved: str = "none"
    containers: list[ContainerRef] = []
    wanted = list(dict.fromkeys(t for r in matched for t in r.targets))
    if wanted and event.action != "remove":
        # The containers running now, as explain finds them: then the plan is the
        # relay's own, exactly what the daemon would run.
        resolved, containers = resolve_containers(wanted, socket=socket, config=config)
    if containers:
        actions = _relay_plan(rules, event, device, containers)
    else:
        resolved = "none"
        actions = plan_for(event, matched)
    if as_json:
        report = {
            "event": {
                "action": event.action,
                "devpath": event.devpath,
                "subsystem": event.subsystem,
                "wire": event.wire.value,
                "seqnum": event.seqnum,
                "properties": dict(event.properties),
            },
            "sysfs": device is not None,
            "matched": [{"name": r.name, "source": str(r.source)} for r in matched],
            "containers_resolved": resolved,
            "actions": [action_to_dict(a) for a in actions],
        }
        print(json.dumps(report, indent=2), file=out)
        return 0
    seqnum = "" if event.seqnum is None else f", seqnum {event.seqnum}"
    print(
        f"event {event.action} {event.devpath} ({event.subsystem}, {event.wire.value} wire"
        f"{seqnum}){'' if device else ', not present here: matching on its properties only'}",
        file=out,
    )
    if not matched:
        print("no rule matches: nothing to do", file=out)
        return 0
    for rule in matched:
        print(f"matched {rule.name} ({rule.source})", file=out)
    if not actions:
        print("no actions for this event", file=out)
    else:
        plural = "s" if len(actions) != 1 else ""
        whose = {
            "daemon": "the running containers, as the daemon knows them",
            "runtimes": "the running containers, asked of the runtimes",
        }.get(resolved, "target patterns: no running container resolved")
        print(f"plan ({len(actions)} action{plural}, nothing was changed; {whose}):", file=out)
        for number, action in enumerate(actions, 1):
            print(f"  {number}. {action.describe()}  [rule {action.origin}]", file=out)
    return 0
