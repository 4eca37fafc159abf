"""Podman: its REST API socket when the service runs, else the ``podman`` tool.

With ``podman system service`` listening (``/run/podman/podman.sock`` for root), the
libpod API gives ``GET /v4.0.0/libpod/containers/json`` (running containers),
``.../containers/NAME/json`` (``State.Pid``) and a Docker-shaped ``/events`` stream.
Without it, Podman is daemonless and its tool is the API: ``podman ps --format json``,
``podman inspect --type container`` and ``podman events --format json``, run with the
global options the operator uses (``--root``, ``--runroot``, ``--events-backend``...).
Podman's containers run under runc (or crun); their device rules are read from the
runc state directory when one is given (``runc_roots``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.base import STREAM_ERRORS, Adapter, HintSend, log
from hotrelay.runtimes.engine_json import names_in_event, ref_from_inspect, refs_from_summaries
from hotrelay.runtimes.errors import RuntimeApiError
from hotrelay.runtimes.http import HttpStatusError, UnixHttpClient
from hotrelay.runtimes.oci import read_state_file
from hotrelay.runtimes.tools import find_tool, run_tool

__all__ = ["DEFAULT_PODMAN_SOCKET", "PodmanAdapter"]

DEFAULT_PODMAN_SOCKET = "/run/podman/podman.sock"
API_PREFIX = "/v4.0.0/libpod"
RECONNECT_DELAY = 1.0


class PodmanAdapter(Adapter):
    """Podman containers, through ``socket_path`` if it exists, else ``podman_argv``."""

    runtime = Runtime.PODMAN

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = DEFAULT_PODMAN_SOCKET,
        *,
        podman_argv: Sequence[str] = ("podman",),
        runc_roots: Sequence[str | os.PathLike[str]] = ("/run/runc",),
        poll_interval: float = 30.0,
        resync_interval: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.client = None if socket_path is None else UnixHttpClient(socket_path, timeout=timeout)
        self.podman_argv = tuple(podman_argv)
        self.runc_roots = tuple(Path(r) for r in runc_roots)
        self.timeout = timeout

    def describe(self) -> str:
        socket = f"socket {self.client.socket_path}, else " if self.client else ""
        return f"{socket}{' '.join(self.podman_argv)}"

    def _use_api(self) -> bool:
        return self.client is not None and os.path.exists(self.client.socket_path)

    def _podman(self, *args: str) -> list[str]:
        return [find_tool(self.podman_argv[0]), *self.podman_argv[1:], *args]

    # -- listing and lookup -----------------------------------------------------------

    async def _list_running(self) -> list[ContainerRef]:
        if self._use_api():
            assert self.client is not None
            summaries = await self.client.get_json(f"{API_PREFIX}/containers/json")
        else:
            result = await run_tool(self._podman("ps", "--format", "json"))
            summaries = self._json(result.check().stdout, "podman ps")
        return await refs_from_summaries(summaries, self._inspect, "podman")

    async def _lookup(self, name: str) -> ContainerRef | None:
        return await self._inspect(name)

    async def _inspect(self, name_or_id: str) -> ContainerRef | None:
        if self._use_api():
            assert self.client is not None
            quoted = urllib.parse.quote(name_or_id, safe="")
            try:
                data = await self.client.get_json(f"{API_PREFIX}/containers/{quoted}/json")
            except HttpStatusError as exc:
                if exc.status == 404:
                    return None
                raise
        else:
            argv = self._podman("inspect", "--type", "container", "--format", "json", name_or_id)
            result = await run_tool(argv)
            if result.returncode != 0:
                if "no such" in result.stderr.lower():
                    return None
                result.check()
            found = self._json(result.stdout, "podman inspect")
            if not isinstance(found, list) or not found:
                return None
            data = found[0]
        return ref_from_inspect(self.runtime, data, self._device_rules, "podman")

    @staticmethod
    def _json(text: str, what: str) -> Any:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RuntimeApiError(f"{what} did not print JSON: {exc}") from None

    def _device_rules(self, container_id: str, pid: int) -> tuple[DeviceRule, ...]:
        for root in self.runc_roots:
            try:
                state = read_state_file(root / container_id / "state.json")
            except (OSError, ValueError):
                continue
            if state.pid == pid:
                return state.device_rules
        return ()

    # -- events -----------------------------------------------------------------------

    async def hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        outage = False

        def subscribed() -> None:
            nonlocal started, outage
            if not started:
                task_status.started()
                started = True
            if outage:
                outage = False
                send.send_nowait(None)  # events were missed: list everything

        while True:
            try:
                if self._use_api():
                    await self._api_events(send, subscribed)
                else:
                    await self._tool_events(send, subscribed)
                raise RuntimeApiError("event stream ended")
            except STREAM_ERRORS as exc:
                log.debug("podman: event stream: %s", exc)
                outage = True
                if not started:
                    task_status.started()
                    started = True
            await trio.sleep(RECONNECT_DELAY)

    async def _api_events(self, send: HintSend, subscribed: Callable[[], None]) -> None:
        assert self.client is not None
        query = urllib.parse.urlencode(
            {"stream": "true", "filters": json.dumps({"type": ["container"]})}
        )
        async with self.client.stream("GET", f"{API_PREFIX}/events?{query}") as response:
            subscribed()
            while (event := await response.next_json()) is not None:
                for name in names_in_event(event):
                    send.send_nowait(name)

    async def _tool_events(self, send: HintSend, subscribed: Callable[[], None]) -> None:
        # --since replays what happened between now and the moment podman attaches.
        since = str(int(time.time()) - 1)
        argv = self._podman(
            "events", "--format", "json", "--filter", "type=container", "--since", since
        )
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(_run_streaming, argv)
            assert process.stdout is not None
            subscribed()
            pending = bytearray()
            while chunk := await process.stdout.receive_some(65536):
                pending += chunk
                while (index := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:index])
                    del pending[: index + 1]
                    name = self._name_in_tool_event(line)
                    if name is not None:
                        send.send_nowait(name)
            nursery.cancel_scope.cancel()

    @staticmethod
    def _name_in_tool_event(line: bytes) -> str | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("Type", "container") != "container":
            return None
        name = event.get("Name")
        return name if isinstance(name, str) and name else None


async def _run_streaming(argv: list[str], *, task_status: trio.TaskStatus[trio.Process]) -> None:
    await trio.run_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=False,
        task_status=task_status,
    )
