"""The daemon's side of the control socket: answers from the relay's state.

Manual grants (``hotrelay attach TARGET DEVICE``) are rules too: each becomes one
``[[rule]]`` in ``STATE_DIR/attached.toml`` that matches exactly that device node and
targets exactly that container. They load through the same validation as the rule
files, survive restarts (the state dir is the daemon's), and the relay treats them like
any rule: the device follows the container across restarts and replugs until detached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from hotrelay import __version__
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.plan import MakeNode
from hotrelay.core.rules import Rule, RuleSetError, load_rules_text
from hotrelay.core.rules.model import Target, TargetError
from hotrelay.errors import HotrelayError
from hotrelay.runtimes.names import resolve_owner_async

if TYPE_CHECKING:
    from hotrelay.daemon.pump import Daemon

__all__ = ["ATTACHED_FILE", "DaemonControl", "attached_rules_path"]

ATTACHED_FILE = "attached.toml"
ATTACH_PREFIX = "attach-"


class ControlError(HotrelayError):
    pass


def attached_rules_path(state_dir: Path) -> Path:
    return state_dir / ATTACHED_FILE


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]!|\\" else c for c in text)


def attach_rule_name(target: str, device: str) -> str:
    digest = hashlib.sha256(f"{target}\0{device}".encode()).hexdigest()[:12]
    return f"{ATTACH_PREFIX}{digest}"


def attach_rule_text(target: str, device: str, options: dict[str, Any]) -> str:
    """One ``[[rule]]`` for a manual attach; validated by the rule loader like any other."""
    lines = [
        "[[rule]]",
        f"name = {_toml_string(attach_rule_name(target, device))}",
        f"description = {_toml_string(f'hotrelay attach {target} {device}')}",
        f"target = [{_toml_string(target)}]",
    ]
    if device.startswith("/sys/class/net/"):
        lines += [
            "[rule.match]",
            'subsystem = "net"',
            f"kernel = {_toml_string(_escape_glob(device.rsplit('/', 1)[-1]))}",
        ]
    elif device.startswith("/dev/"):
        lines += ["[rule.match]", f"devname = {_toml_string(_escape_glob(device))}"]
    else:
        raise ControlError(f"attach: {device!r} is not a /dev/... node or /sys/class/net/... NIC")
    device_keys = {k: v for k, v in options.items() if k in ("path", "mode", "owner", "group")}
    if device_keys:
        lines.append("[rule.device]")
        lines += [
            f"{k} = {v if isinstance(v, int) else _toml_string(str(v))}"
            for k, v in device_keys.items()
        ]
    return "\n".join(lines) + "\n"


class DaemonControl:
    """Implements ``hotrelay.control.protocol.ControlHandler`` for a running Daemon."""

    def __init__(self, daemon: Daemon, nursery: trio.Nursery) -> None:
        self._daemon = daemon
        self._nursery = nursery
        self.started = time.time()

    # -- read-only verbs -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        daemon = self._daemon
        relay = daemon.relay
        source = daemon.source
        counters: dict[str, Any] = {
            "events": relay.stats.events,
            "matched_events": relay.stats.matched_events,
            "applied": relay.stats.applied,
            "undone": relay.stats.undone,
            "failures": relay.stats.failures,
            "resyncs": relay.stats.resyncs,
            "overflows": daemon.stats.overflows,
            "duplicates_dropped": daemon.stats.duplicates,
            "reloads": daemon.stats.reloads,
            "reload_errors": daemon.stats.reload_errors,
            "heals": daemon.stats.heals,
            "dropped_mismatch": daemon.stats.dropped_mismatch,
            "last_mismatch": daemon.stats.last_mismatch,
            "links_left_out": daemon.stats.links_left_out,
        }
        if source is not None:
            counters.update({f"source_{k}": v for k, v in source.stats.as_dict().items()})
        return {
            "version": __version__,
            "uptime": time.time() - self.started,
            "source": None if source is None else source.kind.value,
            "counters": counters,
            "containers": [
                {"runtime": c.runtime.value, "name": c.name, "pid": c.pid, "target": shown(c)}
                for c in relay.containers.values()
            ],
            "rule_files": list(relay.rules.files),
            "targets": _targets_report(relay.rules, list(relay.containers.values())),
            # Manual grants (`hotrelay attach`), standing until detached.
            "attached": [
                rule.description or rule.name
                for rule in relay.rules
                if rule.name.startswith(ATTACH_PREFIX)
            ],
            "rules": len(relay.rules),
            "failing": {str(k): v for k, v in relay.failing().items()},
            # What the current bindings leave out, and why (they apply all the same).
            "left_out": [
                {"binding": str(key), "link": left.link, "reason": left.reason}
                for key, binding in sorted(relay.desired.items(), key=lambda kv: str(kv[0]))
                for left in binding.left_out
            ],
            "last_reload_error": daemon.stats.last_reload_error,
        }

    def grants(self) -> list[dict[str, Any]]:
        relay = self._daemon.relay
        held = relay.held
        rows = []
        for key in sorted(relay.applied, key=str):
            binding = relay.desired.get(key)
            container = relay.containers.get((key.runtime, key.container))
            node = next(
                (a for a in binding.actions if isinstance(a, MakeNode)) if binding else iter(()),
                None,
            )
            rows.append(
                {
                    "container": (
                        shown(container)
                        if container is not None
                        else f"{key.runtime.value}:{key.container}"
                    ),
                    "device": binding.uevent.node or key.devpath if binding else key.devpath,
                    "path": node.path if node is not None else None,
                    "rule": key.rule,
                    "attached": key.rule.startswith(ATTACH_PREFIX),
                    "since": self._daemon.applied_since.get(key),
                    "state": "applied" if binding or key in held else "being undone",
                    "left_out": [
                        f"{left.link}: {left.reason}"
                        for left in (binding.left_out if binding else ())
                    ],
                }
            )
        return rows

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        with self._daemon.feed.subscribe() as channel:
            yield channel

    # -- changing verbs ------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        daemon = self._daemon
        errors = daemon.stats.reload_errors
        await daemon.reload("control socket")
        if daemon.stats.reload_errors != errors:
            raise ControlError(
                f"reload refused, the current rules stay:\n{daemon.stats.last_reload_error}"
            )
        return {"rules": len(daemon.relay.rules), "files": list(daemon.relay.rules.files)}

    async def attach(self, target: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
        """Validate everything first (the target runs, the device exists, the owner and
        group resolve inside, the options are well-formed); only then store the rule."""
        try:
            parsed = Target.parse(target)
        except TargetError as exc:
            raise ControlError(f"attach: target {target!r}: {exc}") from None
        _check_attach_options(options)
        device = await trio.to_thread.run_sync(_host_device, device)
        try:
            running = await self._daemon.running_containers(parsed)
        except (HotrelayError, ValueError) as exc:
            raise ControlError(f"attach: {exc}") from None
        if not running:
            raise ControlError(
                f"attach: no running container is {target} (is it started? is the name "
                "right? `hotrelay status` lists the containers the daemon sees)"
            )
        for container in running:
            try:
                await resolve_owner_async(
                    container, user=options.get("owner", 0), group=options.get("group", 0)
                )
            except HotrelayError as exc:
                raise ControlError(f"attach: {container.target}: {exc}") from None
        text = attach_rule_text(target, device, options)
        path = attached_rules_path(self._daemon.options.state_dir)
        try:
            load_rules_text(text, f"attach {target} {device}")
        except RuleSetError as exc:
            # Say it in the command's terms, not the generated rule's file and line.
            messages = "; ".join(e.message for e in exc.errors)
            raise ControlError(f"attach: {messages}") from None
        current = await trio.to_thread.run_sync(_read, path)
        name = attach_rule_name(target, device)
        if name in current:
            raise ControlError(f"{device} is already attached to {target}; detach it first")
        await trio.to_thread.run_sync(_write, path, current + "\n" + text)
        await self.reload()
        return {
            "attached": device,
            "target": target,
            "rule": name,
            "containers": [shown(c) for c in running],
        }

    async def detach(self, target: str, device: str) -> dict[str, Any]:
        # Named as attach named it (a /sys/... path or a symlink means its node); a
        # device that is gone by now is detached by the name given.
        with contextlib.suppress(ControlError):
            device = await trio.to_thread.run_sync(_host_device, device)
        path = attached_rules_path(self._daemon.options.state_dir)
        current = await trio.to_thread.run_sync(_read, path)
        name = attach_rule_name(target, device)
        blocks = current.split("[[rule]]\n")
        kept = [b for b in blocks if f"name = {_toml_string(name)}" not in b]
        if len(kept) == len(blocks):
            raise ControlError(f"{device} is not attached to {target}")
        await trio.to_thread.run_sync(_write, path, "[[rule]]\n".join(kept))
        await self.reload()
        return {"detached": device, "target": target}

    async def refresh(self, runtime: str, name: str) -> dict[str, Any]:
        try:
            kind = Runtime(runtime)
        except ValueError:
            raise ControlError(f"refresh: unknown runtime {runtime!r}") from None
        if not self._daemon.runtime_enabled(kind):
            raise ControlError(
                f"refresh: the {runtime} runtime is not enabled in this daemon "
                "(see [runtimes] in the config)"
            )
        # Answer at once: LXC runs its hook synchronously, so asking LXC about this
        # container now would wait for the hook, i.e. for us.
        self._nursery.start_soon(self._daemon.refresh_container, kind, name)
        return {"scheduled": f"{runtime}:{name}"}


def shown(container: ContainerRef) -> str:
    """How ``list`` and ``status`` name a container: a pid: target with its start
    time (``pid:PID@STARTTIME``), the form that names that one process only."""
    if container.runtime is Runtime.PID and container.start_time is not None:
        return f"pid:{container.pid}@{container.start_time}"
    return container.target


def _targets_report(rules: Iterable[Rule], containers: list[ContainerRef]) -> list[dict[str, Any]]:
    """Each target the rules name, with the running containers it selects now: a target
    with none (a typo, a stopped container, a runtime not enabled) is visible here
    rather than silent."""
    by_target: dict[str, dict[str, Any]] = {}
    for rule in rules:
        for target in rule.targets:
            entry = by_target.setdefault(
                str(target),
                {
                    "target": str(target),
                    "rules": [],
                    "running": [shown(c) for c in containers if target.selects(c)],
                },
            )
            entry["rules"].append(rule.name)
    return sorted(by_target.values(), key=lambda entry: (bool(entry["running"]), entry["target"]))


def _check_attach_options(options: dict[str, Any]) -> None:
    """--mode, --path, --owner and --group, checked as the command line gave them."""
    mode = options.get("mode")
    if mode is not None:
        text = str(mode)
        if not (text.isascii() and text.isdigit() and set(text) <= set("01234567")) or (
            int(text, 8) > 0o777
        ):
            raise ControlError(f"attach: --mode {text!r} is not an octal mode such as 0660")
    path = options.get("path")
    if path is not None and not (isinstance(path, str) and path.startswith("/dev/")):
        raise ControlError(f"attach: --path {path!r} is not a path below /dev")
    for key in ("owner", "group"):
        value = options.get(key)
        if value is not None and not isinstance(value, int | str):
            raise ControlError(f"attach: --{key} must be a name or a number")


def _host_device(device: str) -> str:
    """The node a DEVICE argument names on this host, checked against sysfs.

    ``/dev/...`` (a symlink such as /dev/serial/by-id/... is followed to its node),
    a ``/sys/...`` device directory with a node (its DEVNAME), or
    ``/sys/class/net/IFACE``. Raises ControlError saying why not.
    """
    if device.startswith("/sys/class/net/"):
        if not os.path.isdir(device):
            raise ControlError(f"attach: {device}: no such network interface on this host")
        return device
    if device.startswith("/sys/"):
        try:
            uevent = Path(device, "uevent").read_text()
        except OSError:
            raise ControlError(f"attach: {device}: no such device in sysfs") from None
        names = [line[8:] for line in uevent.splitlines() if line.startswith("DEVNAME=")]
        if not names:
            raise ControlError(f"attach: {device}: this device has no node (no DEVNAME)")
        device = "/dev/" + names[0]
    if not device.startswith("/dev/"):
        raise ControlError(
            f"attach: {device!r} is not a /dev/... node, a /sys/... device or /sys/class/net/IFACE"
        )
    node = os.path.realpath(device)
    try:
        st = os.stat(node)
    except OSError as exc:
        raise ControlError(f"attach: {device}: {exc.strerror or exc}") from None
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ControlError(f"attach: {device} is not a device node")
    kind = "block" if stat.S_ISBLK(st.st_mode) else "char"
    if not os.path.exists(f"/sys/dev/{kind}/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"):
        raise ControlError(f"attach: {device}: no such device in sysfs (a stale node?)")
    return node


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
