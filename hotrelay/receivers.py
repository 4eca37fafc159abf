"""Which running containers a rule's targets name now: for ``hotrelay explain``.

Asked of the running daemon when there is one (it knows the containers it relays
to), else of the runtimes themselves (the adapters the daemon would use, from the
config). Each target gets its receivers, named with their pid, or the reason it gets
nothing: no container of that name is running, its runtime is not enabled, or the
runtime could not be asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hotrelay.control.client import ControlClient, ControlError
from hotrelay.core.config import DEFAULT_CONFIG_PATH, ConfigError
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.rules import Target
from hotrelay.core.rules.model import parse_pid_target
from hotrelay.errors import HotrelayError

__all__ = ["Receivers", "resolve_containers", "resolve_receivers"]

NOTHING_RUNNING = "no running container has this name (stopped? a typo?)"


@dataclass(frozen=True, slots=True)
class Receivers:
    target: str
    containers: tuple[str, ...]  # "lxc:ha (pid 1234)"
    why_none: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "containers": list(self.containers),
            "why_none": self.why_none,
        }


def _refs_from_status(status: dict[str, Any]) -> list[ContainerRef]:
    refs = []
    for c in status.get("containers", []):
        try:
            runtime = Runtime(c["runtime"])
            start = None
            if runtime is Runtime.PID:
                _, start = parse_pid_target(str(c.get("target", "")).partition(":")[2])
            refs.append(ContainerRef(runtime, str(c["name"]), int(c["pid"]), start_time=start))
        except (KeyError, ValueError, TypeError):
            continue
    return refs


def _named(refs: list[ContainerRef]) -> tuple[str, ...]:
    return tuple(f"{ref.target} (pid {ref.pid})" for ref in refs)


@dataclass(frozen=True, slots=True)
class _Asked:
    """One target as the runtimes answered: its containers, or why none."""

    target: Target
    refs: list[ContainerRef]
    why_none: str | None


async def _ask_runtimes(targets: list[Target], config: Path) -> list[_Asked]:
    """Each target resolved by its runtime's adapter, built from the config once."""
    # Imported here: the adapters pull in every runtime's client.
    from hotrelay.daemon.main import build_adapters, load_config

    try:
        adapters = build_adapters(load_config(config).runtimes)
    except (ConfigError, HotrelayError) as exc:
        return [_Asked(t, [], f"cannot read the config: {exc}") for t in targets]
    asked = []
    for target in targets:
        adapter = next((a for a in adapters if a.runtime is target.runtime), None)
        if adapter is None:
            disabled = f"the {target.runtime.value} runtime is not enabled ([runtimes] in {config})"
            asked.append(_Asked(target, [], disabled))
            continue
        try:
            refs = [r for r in await adapter.resolve(target.pattern) if target.selects(r)]
        except (OSError, ValueError) as exc:
            asked.append(_Asked(target, [], f"could not ask {target.runtime.value}: {exc}"))
            continue
        why: str | None = None if refs else NOTHING_RUNNING
        unavailable = adapter.unavailable_reason
        if not refs and unavailable is not None:
            why = f"the {target.runtime.value} runtime is not available here: {unavailable}"
        asked.append(_Asked(target, refs, why))
    return asked


def _defaults(socket: Path | None, config: Path | None) -> tuple[Path, Path]:
    """The daemon's socket and config when the command line names neither."""
    from hotrelay.control_cli import default_socket

    config = config or Path(DEFAULT_CONFIG_PATH)
    return socket or default_socket(config), config


def resolve_containers(
    targets: list[Target], *, socket: Path | None = None, config: Path | None = None
) -> tuple[str, list[ContainerRef]]:
    """("daemon" or "runtimes", the running containers the targets name)."""
    socket, config = _defaults(socket, config)
    status = _daemon_status(socket)
    if status is not None:
        refs = _refs_from_status(status)
        return "daemon", [r for r in refs if any(t.selects(r) for t in targets)]
    found: dict[tuple[object, str], ContainerRef] = {}
    for asked in trio.run(_ask_runtimes, targets, config):
        found.update((ref.key, ref) for ref in asked.refs)
    return "runtimes", list(found.values())


def _daemon_status(socket: Path) -> dict[str, Any] | None:
    try:
        with ControlClient(socket, timeout=5) as client:
            status = client.request("status")
    except (ControlError, OSError):
        return None
    return status if isinstance(status, dict) else None


def resolve_receivers(
    targets: list[Target], *, socket: Path | None = None, config: Path | None = None
) -> tuple[str, list[Receivers]]:
    """("daemon" or "runtimes", the receivers of each target)."""
    socket, config = _defaults(socket, config)
    status = _daemon_status(socket)
    if status is not None:
        refs = _refs_from_status(status)
        receivers = []
        for target in targets:
            chosen = _named([ref for ref in refs if target.selects(ref)])
            receivers.append(Receivers(str(target), chosen, None if chosen else NOTHING_RUNNING))
        return "daemon", receivers
    asked = trio.run(_ask_runtimes, targets, config)
    return "runtimes", [Receivers(str(a.target), _named(a.refs), a.why_none) for a in asked]
