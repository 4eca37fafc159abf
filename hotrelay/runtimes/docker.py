"""Docker: the Engine API on the daemon's unix socket.

``GET /containers/json`` lists the running containers, ``GET /containers/NAME/json``
gives one's ``State.Pid``; ``GET /events`` (filtered to containers) streams ``start``,
``die``, ``destroy`` and ``rename`` as they happen. The Engine API does not state the
device rules runc was given, so they are read from the runc state Docker keeps under
its exec root (``EXEC_ROOT/runtime-runc/moby/ID/state.json``) when that is readable.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.base import STREAM_ERRORS, Adapter, HintSend, log
from hotrelay.runtimes.engine_json import names_in_event, ref_from_inspect, refs_from_summaries
from hotrelay.runtimes.errors import RuntimeApiError, RuntimeUnavailable
from hotrelay.runtimes.http import HttpStatusError, UnixHttpClient
from hotrelay.runtimes.oci import read_state_file

__all__ = ["DEFAULT_DOCKER_SOCKET", "DockerAdapter"]

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
DEFAULT_EXEC_ROOT = "/run/docker"
API_VERSION = "v1.41"  # Docker 20.10; newer daemons accept older versions
LIFECYCLE_ACTIONS = ("start", "die", "destroy", "rename", "restart", "kill", "stop")
RECONNECT_DELAY = 1.0


class DockerAdapter(Adapter):
    """Containers of one Docker daemon (``-H unix://SOCKET``)."""

    runtime = Runtime.DOCKER
    events_path_prefix = f"/{API_VERSION}"

    def __init__(
        self,
        socket_path: str | os.PathLike[str] = DEFAULT_DOCKER_SOCKET,
        *,
        exec_root: str | os.PathLike[str] | None = DEFAULT_EXEC_ROOT,
        poll_interval: float = 30.0,
        resync_interval: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.client = UnixHttpClient(socket_path, timeout=timeout)
        self.exec_root = None if exec_root is None else Path(exec_root)

    def describe(self) -> str:
        return f"socket {self.client.socket_path}"

    def _check_socket(self) -> None:
        if not os.path.exists(self.client.socket_path):
            raise RuntimeUnavailable(f"{self.client.socket_path} does not exist")

    async def _list_running(self) -> list[ContainerRef]:
        self._check_socket()
        summaries = await self.client.get_json(f"/{API_VERSION}/containers/json")
        return await refs_from_summaries(summaries, self._inspect, "docker")

    async def _lookup(self, name: str) -> ContainerRef | None:
        self._check_socket()
        return await self._inspect(name)

    async def _inspect(self, name_or_id: str) -> ContainerRef | None:
        quoted = urllib.parse.quote(name_or_id, safe="")
        try:
            data = await self.client.get_json(f"/{API_VERSION}/containers/{quoted}/json")
        except HttpStatusError as exc:
            if exc.status == 404:
                return None
            raise
        return ref_from_inspect(self.runtime, data, self._device_rules, "docker")

    def _device_rules(self, container_id: str, pid: int) -> tuple[DeviceRule, ...]:
        if self.exec_root is None or not container_id:
            return ()
        state_file = self.exec_root / "runtime-runc" / "moby" / container_id / "state.json"
        try:
            state = read_state_file(state_file)
        except (OSError, ValueError):
            return ()
        if state.pid != pid:
            return ()
        return state.device_rules

    def _events_path(self) -> str:
        filters = {"type": ["container"], "event": list(LIFECYCLE_ACTIONS)}
        query = urllib.parse.urlencode({"filters": json.dumps(filters)})
        return f"{self.events_path_prefix}/events?{query}"

    async def hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        outage = False
        while True:
            try:
                async with self.client.stream("GET", self._events_path()) as response:
                    if not started:
                        task_status.started()
                        started = True
                    if outage:
                        outage = False
                        send.send_nowait(None)  # events were missed: list everything
                    while (event := await response.next_json()) is not None:
                        for name in names_in_event(event):
                            send.send_nowait(name)
                raise RuntimeApiError("event stream ended")
            except STREAM_ERRORS as exc:
                log.debug("%s: event stream: %s", self.runtime.value, exc)
                if not started:
                    task_status.started()
                    started = True
                outage = True
                await trio.sleep(RECONNECT_DELAY)
