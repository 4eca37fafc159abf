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
from hotrelay.core.config import ConfigError
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


def _from_status(target: Target, status: dict[str, Any]) -> Receivers:
    refs = _refs_from_status(status)
    chosen = tuple(f"{ref.target} (pid {ref.pid})" for ref in refs if target.selects(ref))
    return Receivers(str(target), chosen, None if chosen else NOTHING_RUNNING)


async def _refs_from_runtimes(targets: list[Target], config: Path) -> list[ContainerRef]:
    from hotrelay.daemon.main import build_adapters, load_config

    try:
        adapters = build_adapters(load_config(config).runtimes)
    except (ConfigError, HotrelayError):
        return []
    refs: dict[tuple[object, str], ContainerRef] = {}
    for target in targets:
        for adapter in adapters:
            if adapter.runtime is target.runtime:
                try:
                    found = await adapter.resolve(target.pattern)
                except (OSError, ValueError):
                    continue
                refs.update((ref.key, ref) for ref in found if target.selects(ref))
    return list(refs.values())


def resolve_containers(
    targets: list[Target], *, socket: Path, config: Path
) -> tuple[str, list[ContainerRef]]:
    """("daemon" or "runtimes", the running containers the targets name)."""
    status = _daemon_status(socket)
    if status is not None:
        refs = _refs_from_status(status)
        return "daemon", [r for r in refs if any(t.selects(r) for t in targets)]
    return "runtimes", trio.run(_refs_from_runtimes, targets, config)


def _daemon_status(socket: Path) -> dict[str, Any] | None:
    try:
        with ControlClient(socket, timeout=5) as client:
            status = client.request("status")
    except (ControlError, OSError):
        return None
    return status if isinstance(status, dict) else None


async def _from_runtimes(targets: list[Target], config: Path) -> list[Receivers]:
    # Imported here: the adapters pull in every runtime's client.
    from hotrelay.daemon.main import build_adapters, load_config

    try:
        adapters = build_adapters(load_config(config).runtimes)
    except (ConfigError, HotrelayError) as exc:
        return [Receivers(str(t), (), f"cannot read the config: {exc}") for t in targets]
    out = []
    for target in targets:
        adapter = next((a for a in adapters if a.runtime is target.runtime), None)
        if adapter is None:
            disabled = f"the {target.runtime.value} runtime is not enabled ([runtimes] in {config})"
            out.append(Receivers(str(target), (), disabled))
            continue
        try:
            refs = [r for r in await adapter.resolve(target.pattern) if target.selects(r)]
        except (OSError, ValueError) as exc:
            out.append(Receivers(str(target), (), f"could not ask {target.runtime.value}: {exc}"))
            continue
        chosen = tuple(f"{ref.target} (pid {ref.pid})" for ref in refs)
        unavailable = adapter.unavailable_reason
        why: str | None = None if chosen else NOTHING_RUNNING
        if not chosen and unavailable is not None:
            why = f"the {target.runtime.value} runtime is not available here: {unavailable}"
        out.append(Receivers(str(target), chosen, why))
    return out


def resolve_receivers(
    targets: list[Target], *, socket: Path, config: Path
) -> tuple[str, list[Receivers]]:
    """("daemon" or "runtimes", the receivers of each target)."""
    status = _daemon_status(socket)
    if status is not None:
        return "daemon", [_from_status(t, status) for t in targets]
    return "runtimes", trio.run(_from_runtimes, targets, config)
