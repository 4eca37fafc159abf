"""The daemon's side of the control socket: answers from the relay's state.

Manual grants (``hotrelay attach TARGET DEVICE``) are rules too: each becomes one
``[[rule]]`` in ``STATE_DIR/attached.toml`` that matches exactly that device node and
targets exactly that container. They load through the same validation as the rule
files, survive restarts (the state dir is the daemon's), and the relay treats them like
any rule: the device follows the container across restarts and replugs until detached.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from hotrelay import __version__
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.plan import MakeNode
from hotrelay.core.rules import RuleSetError, load_rules_text
from hotrelay.core.rules.model import Target, TargetError
from hotrelay.errors import HotrelayError

if TYPE_CHECKING:
    from hotrelay.daemon.pump import Daemon

__all__ = ["ATTACHED_FILE", "DaemonControl", "attached_rules_path"]

ATTACHED_FILE = "attached.toml"


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
    return f"attach-{digest}"


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
        try:
            Target.parse(target)
        except TargetError as exc:
            raise ControlError(f"attach: target {target!r}: {exc}") from None
        text = attach_rule_text(target, device, options)
        path = attached_rules_path(self._daemon.options.state_dir)
        try:
            load_rules_text(text, f"attach {target} {device}")
        except RuleSetError as exc:
            raise ControlError(str(exc)) from None
        current = await trio.to_thread.run_sync(_read, path)
        name = attach_rule_name(target, device)
        if name in current:
            raise ControlError(f"{device} is already attached to {target}; detach it first")
        await trio.to_thread.run_sync(_write, path, current + "\n" + text)
        await self.reload()
        return {"attached": device, "target": target, "rule": name}

    async def detach(self, target: str, device: str) -> dict[str, Any]:
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
