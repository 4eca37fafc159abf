"""LXD and Incus: their REST API on the daemon's unix socket (the same API for both).

``GET /1.0/instances?recursion=1`` lists instances with their status; for each running
container ``GET /1.0/instances/NAME/state`` gives the init ``pid``. Lifecycle events
(``instance-started``, ``instance-stopped``, ``instance-restarted``, ...) arrive on
``GET /1.0/events?type=lifecycle`` upgraded to a WebSocket.

Instances of the ``default`` project are named as LXD names them; an instance of
another project is ``PROJECT_NAME`` (LXD's own internal name, also its cgroup's name:
``lxc.payload.PROJECT_NAME``; instance names cannot contain ``_``). Virtual machines
have no init process on the host and are ignored.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.runtimes.base import STREAM_ERRORS, Adapter, HintSend, log
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError, RuntimeUnavailable
from hotrelay.runtimes.http import HttpStatusError, UnixHttpClient
from hotrelay.runtimes.procfs import snapshot

__all__ = ["DEFAULT_INCUS_SOCKETS", "DEFAULT_LXD_SOCKETS", "IncusAdapter", "LxdAdapter"]

DEFAULT_LXD_SOCKETS = ("/var/snap/lxd/common/lxd/unix.socket", "/var/lib/lxd/unix.socket")
DEFAULT_INCUS_SOCKETS = ("/var/lib/incus/unix.socket",)
DEFAULT_PROJECT = "default"
RECONNECT_DELAY = 1.0


def _split_name(name: str) -> tuple[str, str]:
    """``PROJECT_NAME`` -> (PROJECT, NAME); a plain name is in the default project."""
    project, sep, instance = name.rpartition("_")
    return (project, instance) if sep and project else (DEFAULT_PROJECT, name)


def _join_name(project: str, instance: str) -> str:
    return instance if project == DEFAULT_PROJECT else f"{project}_{instance}"


def _metadata(document: Any, what: str) -> Any:
    if not isinstance(document, dict) or "metadata" not in document:
        raise RuntimeApiError(f"{what}: not an LXD API response")
    return document["metadata"]


class LxdAdapter(Adapter):
    """Containers of one LXD daemon; the first socket of ``sockets`` that exists is used."""

    runtime = Runtime.LXD
    default_sockets: tuple[str, ...] = DEFAULT_LXD_SOCKETS

    def __init__(
        self,
        sockets: Sequence[str | os.PathLike[str]] | None = None,
        *,
        poll_interval: float = 30.0,
        resync_interval: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.sockets = tuple(os.fspath(s) for s in (sockets or self.default_sockets))
        self.timeout = timeout
        self._all_projects = True

    def describe(self) -> str:
        return "socket " + " or ".join(self.sockets)

    def _client(self) -> UnixHttpClient:
        for path in self.sockets:
            if os.path.exists(path):
                return UnixHttpClient(path, timeout=self.timeout)
        raise RuntimeUnavailable(f"no API socket ({', '.join(self.sockets)})")

    async def _get(self, client: UnixHttpClient, path: str) -> Any:
        return _metadata(await client.get_json(path), path)

    async def _list_running(self) -> list[ContainerRef]:
        client = self._client()
        instances = await self._list_instances(client)
        refs = []
        for instance in instances:
            if not isinstance(instance, dict):
                continue
            if instance.get("type", "container") != "container":
                continue
            if instance.get("status") != "Running":
                continue
            name = _join_name(
                str(instance.get("project") or DEFAULT_PROJECT), str(instance.get("name"))
            )
            try:
                ref = await self._state(client, name)
            except ContainerGone:
                continue
            if ref is not None:
                refs.append(ref)
        return refs

    async def _list_instances(self, client: UnixHttpClient) -> list[Any]:
        if self._all_projects:
            try:
                found = await self._get(client, "/1.0/instances?recursion=1&all-projects=true")
            except HttpStatusError as exc:
                if exc.status != 400:
                    raise
                log.info("%s: no all-projects support; listing the default project", self)
                self._all_projects = False
            else:
                return list(found or [])
        return list(await self._get(client, "/1.0/instances?recursion=1") or [])

    async def _lookup(self, name: str) -> ContainerRef | None:
        return await self._state(self._client(), name)

    async def _state(self, client: UnixHttpClient, name: str) -> ContainerRef | None:
        project, instance = _split_name(name)
        query = urllib.parse.urlencode({"project": project})
        path = f"/1.0/instances/{urllib.parse.quote(instance, safe='')}/state?{query}"
        try:
            state = await self._get(client, path)
        except HttpStatusError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(state, dict):
            raise RuntimeApiError(f"{path}: state is not an object")
        pid = state.get("pid")
        if state.get("status") != "Running" or not isinstance(pid, int) or pid <= 0:
            return None
        return snapshot(self.runtime, name, pid, id=name)

    def _events_path(self) -> str:
        query = {"type": "lifecycle"}
        if self._all_projects:
            query["all-projects"] = "true"
        return "/1.0/events?" + urllib.parse.urlencode(query)

    async def hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        outage = False
        while True:
            try:
                client = self._client()
                try:
                    websocket_cm = client.websocket(self._events_path())
                    async with websocket_cm as websocket:
                        if not started:
                            task_status.started()
                            started = True
                        if outage:
                            outage = False
                            send.send_nowait(None)
                        while True:
                            name = self._name_in_event(await websocket.receive_json())
                            if name is not None:
                                send.send_nowait(name)
                except HttpStatusError as exc:
                    if exc.status == 400 and self._all_projects:
                        self._all_projects = False
                        continue
                    raise
            except STREAM_ERRORS as exc:
                log.debug("%s: event stream: %s", self.runtime.value, exc)
                if not started:
                    task_status.started()
                    started = True
                outage = True
                await trio.sleep(RECONNECT_DELAY)

    @staticmethod
    def _name_in_event(event: Any) -> str | None:
        """The instance a lifecycle event is about, as we name it; None if not one."""
        if not isinstance(event, dict) or event.get("type") != "lifecycle":
            return None
        metadata = event.get("metadata") or {}
        action = str(metadata.get("action", ""))
        source = str(metadata.get("source", ""))
        if not action.startswith("instance-"):
            return None
        url = urllib.parse.urlsplit(source)
        prefix = "/1.0/instances/"
        if not url.path.startswith(prefix):
            return None
        instance = urllib.parse.unquote(url.path[len(prefix) :].split("/")[0])
        if not instance:
            return None
        params = urllib.parse.parse_qs(url.query)
        project = params.get("project", [None])[0] or event.get("project") or DEFAULT_PROJECT
        return _join_name(str(project), instance)


class IncusAdapter(LxdAdapter):
    """Incus: LXD's API under another name."""

    runtime = Runtime.INCUS
    default_sockets = DEFAULT_INCUS_SOCKETS
