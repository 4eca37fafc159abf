"""The container JSON that Docker's Engine API and Podman share.

Docker (``GET /containers/json``, ``GET /containers/NAME/json``, ``/events``) and
Podman (its libpod API, and ``podman ps``/``inspect --format json``) describe
containers in the same shape: a list of summaries with ``Id``, an inspect object with
``Id``, ``Name`` and ``State.{Running,Pid}``, and events with ``Type`` and
``Actor.Attributes.{name,oldName}``. One reading of it serves both adapters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError
from hotrelay.runtimes.procfs import snapshot

__all__ = ["names_in_event", "ref_from_inspect", "refs_from_summaries"]

Inspect = Callable[[str], Awaitable[ContainerRef | None]]
DeviceRules = Callable[[str, int], tuple[DeviceRule, ...]]


async def refs_from_summaries(summaries: Any, inspect: Inspect, what: str) -> list[ContainerRef]:
    """Inspect every container of a summary list; those gone meanwhile are left out."""
    if not isinstance(summaries, list):
        raise RuntimeApiError(f"{what}: the container list is not a list")
    refs = []
    for summary in summaries:
        if not isinstance(summary, dict) or not isinstance(summary.get("Id"), str):
            continue
        try:
            ref = await inspect(summary["Id"])
        except ContainerGone:
            continue
        if ref is not None:
            refs.append(ref)
    return refs


def ref_from_inspect(
    runtime: Runtime, data: Any, device_rules: DeviceRules, what: str
) -> ContainerRef | None:
    """The running container an inspect object describes; None if it is not running."""
    if not isinstance(data, dict):
        raise RuntimeApiError(f"{what}: container inspect is not an object")
    state = data.get("State") or {}
    pid = state.get("Pid")
    if not state.get("Running") or not isinstance(pid, int) or pid <= 0:
        return None
    container_id = str(data.get("Id", ""))
    name = str(data.get("Name", "")).lstrip("/") or container_id
    return snapshot(
        runtime, name, pid, id=container_id, base_device_rules=device_rules(container_id, pid)
    )


def names_in_event(event: Mapping[str, Any]) -> list[str]:
    """The container names a lifecycle event is about (a rename names both)."""
    if not isinstance(event, dict) or event.get("Type", "container") != "container":
        return []
    attributes = (event.get("Actor") or {}).get("Attributes") or {}
    names = [attributes.get("name"), attributes.get("oldName")]
    return [str(n).lstrip("/") for n in names if isinstance(n, str) and n]
