"""Incus and systemd-nspawn cannot run here: their adapters meet local fakes that speak
the real wire format, backed by real sandbox containers.

- Incus: its REST API (LXD's) on a unix socket served by this test with trio: sync
  responses in the ``{"type": "sync", ..., "metadata": ...}`` envelope, error
  responses with ``error_code``, and ``/1.0/events`` upgraded to a WebSocket that
  carries lifecycle events as text frames.
- machined: ``/run/systemd/machines``-style files (KEY=VALUE lines, written to a
  temporary name and renamed into place, ``unit:`` symlinks beside them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from hotrelay.core.containers import ContainerEvent, ContainerStarted, ContainerStopped, Runtime
from hotrelay.runtimes.lxd import IncusAdapter
from hotrelay.runtimes.nspawn import NspawnAdapter
from hotrelay.testing.containers import next_event_for
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.sandbox import IdMap as SandboxIdMap

pytestmark = pytest.mark.privileged

# -- a fake Incus daemon ------------------------------------------------------------------


@dataclass
class FakeIncus:
    """Instance name (as PROJECT/NAME) -> init pid, None when stopped."""

    instances: dict[tuple[str, str], int | None] = field(default_factory=dict)
    events: tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]] = field(
        default_factory=lambda: trio.open_memory_channel[bytes](100)
    )
    requests: list[str] = field(default_factory=list)

    def lifecycle(self, action: str, project: str, name: str) -> None:
        source = f"/1.0/instances/{name}" + ("" if project == "default" else f"?project={project}")
        event = {
            "type": "lifecycle",
            "timestamp": "2026-11-22T08:00:00.000000000Z",
            "metadata": {"action": action, "source": source, "context": {}},
            "location": "none",
            "project": project,
        }
        self.events[0].send_nowait(json.dumps(event).encode())


def sync_response(metadata: object) -> bytes:
    return json.dumps(
        {"type": "sync", "status": "Success", "status_code": 200, "operation": "",
         "error_code": 0, "error": "", "metadata": metadata}
    ).encode()  # fmt: skip


def error_response(code: int, message: str) -> bytes:
    return json.dumps(
        {"type": "error", "status": "", "status_code": 0, "operation": "",
         "error_code": code, "error": message, "metadata": None}
    ).encode()  # fmt: skip


def instance_json(project: str, name: str, pid: int | None) -> dict[str, object]:
    return {
        "architecture": "x86_64", "config": {}, "devices": {}, "ephemeral": False,
        "profiles": ["default"], "stateful": False, "description": "", "name": name,
        "status": "Running" if pid else "Stopped", "status_code": 103 if pid else 102,
        "type": "container", "project": project, "location": "none",
    }  # fmt: skip


async def handle_incus(fake: FakeIncus, stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
    request_line, *header_lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    _, target, _ = request_line.split(" ")
    fake.requests.append(target)
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(url.query)
    project = query.get("project", ["default"])[0]
    if url.path == "/1.0/events" and headers.get("upgrade", "").lower() == "websocket":
        accept = base64.b64encode(
            hashlib.sha1(
                headers["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            ).digest()
        )
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        async for payload in fake.events[1]:
            await stream.send_all(bytes([0x81, len(payload)]) + payload if len(payload) < 126
                                  else bytes([0x81, 126]) + len(payload).to_bytes(2, "big")
                                  + payload)  # fmt: skip
        return
    status, body = 404, error_response(404, "Not Found")
    if url.path == "/1.0/instances" and query.get("recursion") == ["1"]:
        listing = [instance_json(p, n, pid) for (p, n), pid in sorted(fake.instances.items())]
        status, body = 200, sync_response(listing)
    elif url.path.startswith("/1.0/instances/") and url.path.endswith("/state"):
        name = urllib.parse.unquote(url.path.split("/")[3])
        if (project, name) in fake.instances:
            pid = fake.instances[(project, name)]
            state = {"status": "Running" if pid else "Stopped",
                     "status_code": 103 if pid else 102, "pid": pid or 0,
                     "processes": 2 if pid else 0, "cpu": {"usage": 0}}  # fmt: skip
            status, body = 200, sync_response(state)
        else:
            body = error_response(404, "Instance not found")
    reason = b"OK" if status == 200 else b"Not Found"
    await stream.send_all(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (status, reason, len(body), body)
    )


@asynccontextmanager
async def serve_incus(path: Path, fake: FakeIncus) -> AsyncIterator[None]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            await handle_incus(fake, stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, [trio.SocketListener(sock)])
        yield
        nursery.cancel_scope.cancel()


async def test_incus_adapter_against_a_fake_daemon(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    c1 = make_sandbox(userns=SandboxIdMap(0, 1000000, 65536))
    lab = make_sandbox()
    fake = FakeIncus({("default", "c1"): c1.pid, ("lab", "web"): lab.pid, ("default", "off"): None})
    socket_path = tmp_path / "unix.socket"
    async with serve_incus(socket_path, fake):
        adapter = IncusAdapter([socket_path], poll_interval=3600, resync_interval=3600)
        [ref] = await adapter.resolve("c1")
        assert ref.runtime is Runtime.INCUS
        assert (ref.name, ref.pid) == ("c1", c1.pid)
        assert ref.uid_map.to_host(0) == 1000000
        assert {r.name: r.pid for r in await adapter.list_running()} == {
            "c1": c1.pid,
            "lab_web": lab.pid,  # another project: PROJECT_NAME
        }
        assert await adapter.resolve("off") == []
        assert await adapter.resolve("missing") == []
        assert "/1.0/instances/web/state?project=lab" in fake.requests

        c2 = make_sandbox()
        send, receive = trio.open_memory_channel[ContainerEvent](100)
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.watch, send)
            first = await next_event_for(receive, "c1")
            assert isinstance(first, ContainerStarted)
            assert any(r.startswith("/1.0/events?type=lifecycle") for r in fake.requests)

            fake.instances[("default", "c2")] = c2.pid
            fake.lifecycle("instance-started", "default", "c2")
            started = await next_event_for(receive, "c2")
            assert isinstance(started, ContainerStarted)
            assert started.container.pid == c2.pid

            # Incus says c1 stopped; its init is still there (being torn down).
            fake.instances[("default", "c1")] = None
            fake.lifecycle("instance-stopped", "default", "c1")
            stopped = await next_event_for(receive, "c1")
            assert stopped == ContainerStopped(first.container, "runtime")
            nursery.cancel_scope.cancel()


async def test_incus_absent_is_skipped(tmp_path: Path) -> None:
    adapter = IncusAdapter([tmp_path / "unix.socket"])
    assert await adapter.list_running() == []
    assert "no API socket" in (adapter.unavailable_reason or "")


# -- a fake machined ----------------------------------------------------------------------


def register_machine(machines: Path, name: str, leader: int, *, klass: str = "container") -> None:
    """Write a machine file the way machined does: temp file, then rename over."""
    text = (
        "# This is private data. Do not parse.\n"
        f"NAME={name}\nSCOPE=machine-{name}.scope\nSERVICE=systemd-nspawn@{name}.service\n"
        f"ROOT=/var/lib/machines/{name}\nID={os.urandom(16).hex()}\nLEADER={leader}\n"
        f"CLASS={klass}\nREALTIME=1795334221000000\nMONOTONIC=80077000\nNETIF=3\n"
    )
    temporary = machines / f".#{name}XXXXXX"
    temporary.write_text(text)
    temporary.rename(machines / name)
    link = machines / f"unit:machine-{name}.scope"
    if not link.is_symlink():
        link.symlink_to(name)


async def test_nspawn_adapter_reads_machined_files(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    machines = tmp_path / "machines"
    machines.mkdir()
    web = make_sandbox()
    register_machine(machines, "web", web.pid)
    register_machine(machines, "vm1", os.getpid(), klass="vm")  # not a container
    adapter = NspawnAdapter(machines, poll_interval=0.1, resync_interval=3600)

    [ref] = await adapter.resolve("web")
    assert ref.runtime is Runtime.NSPAWN
    assert (ref.name, ref.pid) == ("web", web.pid)
    assert [r.name for r in await adapter.list_running()] == ["web"]
    assert await adapter.resolve("vm1") == []
    assert await adapter.resolve("unit:machine-web.scope") == []

    db = make_sandbox()
    send, receive = trio.open_memory_channel[ContainerEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.watch, send)
        first = await next_event_for(receive, "web")
        assert isinstance(first, ContainerStarted)

        register_machine(machines, "db", db.pid)
        started = await next_event_for(receive, "db")
        assert isinstance(started, ContainerStarted)
        assert started.container.pid == db.pid

        await trio.to_thread.run_sync(web.close)
        stopped = await next_event_for(receive, "web")
        assert stopped == ContainerStopped(first.container, "exited")

        (machines / "db").unlink()  # machined unregistered it
        gone = await next_event_for(receive, "db")
        assert isinstance(gone, ContainerStopped)
        assert gone.reason in ("vanished", "runtime")
        nursery.cancel_scope.cancel()


async def test_nspawn_without_machined_is_skipped(tmp_path: Path) -> None:
    adapter = NspawnAdapter(tmp_path / "machines")
    assert await adapter.list_running() == []
    assert "no machined" in (adapter.unavailable_reason or "")
