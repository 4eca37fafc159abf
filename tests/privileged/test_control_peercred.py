"""The control socket against real non-root peers: the kernel's word on who connects.

Each peer is a real child process that dropped to uid 65534 (nobody), with or without
the allowed group, and talks to a real server over the socket. The child uses only
the standard library and the base interpreter, so nothing it needs is behind a
directory nobody cannot read.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from hotrelay.control.server import Broadcaster, ControlServer, ControlSettings, serve_control

pytestmark = pytest.mark.privileged

NOBODY = 65534
GROUP = 54321  # allowed the read-only verbs; no name needed, the kernel deals in numbers
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))

# Connects, sends each request line and reads its answer, prints what came back (or the
# errno of connect). Stops early when the server hangs up.
PEER = """\
import json, socket, sys
requests = json.loads(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_errno": exc.errno}))
    sys.exit(0)
answers, buffer = [], b""
for request in requests:
    try:
        sock.sendall(json.dumps(request).encode() + b"\\n")
    except OSError:
        pass  # a refusing server may hang up first; its answer is still ours to read
    while b"\\n" not in buffer:
        try:
            chunk = sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
    if b"\\n" not in buffer:
        break
    line, buffer = buffer.split(b"\\n", 1)
    answers.append(json.loads(line))
try:
    sock.shutdown(socket.SHUT_WR)  # done asking: the server ends the connection
    closed = sock.recv(1) == b""
except OSError:
    closed = True
print(json.dumps({"answers": answers, "closed": closed}))
"""


class Handler:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.feed = Broadcaster()

    def status(self) -> dict[str, Any]:
        self.calls.append("status")
        return {"uptime": 1}

    def grants(self) -> list[dict[str, Any]]:
        self.calls.append("list")
        return []

    async def attach(self, target: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("attach")
        return {}

    async def detach(self, target: str, device: str) -> dict[str, Any]:
        self.calls.append("detach")
        return {}

    async def reload(self) -> dict[str, Any]:
        self.calls.append("reload")
        return {}

    async def refresh(self, runtime: str, name: str) -> dict[str, Any]:
        self.calls.append("refresh")
        return {}

    def subscribe(self) -> Any:
        self.calls.append("monitor")
        return self.feed.subscribe()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can pass through (but not list): /tmp/pytest-of-root is 0700."""
    path = Path(tempfile.mkdtemp(prefix="hr-peer-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@asynccontextmanager
async def running(handler: Handler, settings: ControlSettings) -> AsyncIterator[ControlServer]:
    async with trio.open_nursery() as nursery:
        server: ControlServer = await nursery.start(
            lambda task_status: serve_control(handler, settings, task_status=task_status)
        )
        yield server
        nursery.cancel_scope.cancel()


async def peer(
    path: Path, requests: list[dict[str, Any]], *, gid: int = NOBODY, groups: tuple[int, ...] = ()
) -> dict[str, Any]:
    done = await trio.run_process(
        [PYTHON, "-I", "-c", PEER, str(path), json.dumps(requests)],
        user=NOBODY,
        group=gid,
        extra_groups=list(groups),  # also clears root's own supplementary groups
        cwd="/",
        capture_stdout=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


STATUS = {"id": 1, "verb": "status"}
LIST = {"id": 2, "verb": "list"}
ATTACH = {"id": 3, "verb": "attach", "args": {"target": "lxc:a", "device": "/dev/null"}}
RELOAD = {"id": 4, "verb": "reload"}
MONITOR = {"id": 5, "verb": "monitor"}


async def test_socket_is_root_only_without_a_group(public_dir: Path) -> None:
    path = public_dir / "run" / "control.sock"
    handler = Handler()
    async with running(handler, ControlSettings(path)):
        info = path.lstat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        # The file system stops nobody before the daemon has to.
        assert await peer(path, [STATUS]) == {"connect_errno": 13}
        # With the file opened up (a loose SocketMode, say), the daemon still refuses.
        path.parent.chmod(0o711)
        path.chmod(0o666)
        refused = await peer(path, [STATUS, ATTACH])
        assert refused == {
            "answers": [
                {
                    "id": None,
                    "ok": False,
                    "error": "permission denied: uid 65534 may not use the hotrelay control "
                    "socket (root only; socket_group in hotrelay.toml can allow a group the "
                    "read-only verbs)",
                    "code": "denied",
                }
            ],
            "closed": True,
        }
    assert handler.calls == []


async def test_group_members_get_the_read_only_verbs(public_dir: Path) -> None:
    path = public_dir / "run" / "control.sock"
    handler = Handler()
    async with running(handler, ControlSettings(path, group=GROUP)) as server:
        info = path.lstat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, 0, GROUP)
        directory = path.parent.stat()
        assert (stat.S_IMODE(directory.st_mode), directory.st_gid) == (0o710, GROUP)

        denied = (
            'permission denied: "{}" needs root; members of the socket group may use '
            "list, monitor, status"
        )
        # A supplementary member (SO_PEERGROUPS) ...
        member = await peer(path, [STATUS, LIST, ATTACH, RELOAD], groups=(GROUP,))
        # ... and a primary one (SO_PEERCRED's gid).
        primary = await peer(path, [STATUS, ATTACH], gid=GROUP)
        watcher = await peer(path, [MONITOR], groups=(GROUP,))
        # Not a member: the directory (0710 root:GROUP) keeps it out.
        stranger = await peer(path, [STATUS])
        refused_before = server.refused

    assert [a["ok"] for a in member["answers"]] == [True, True, False, False]
    assert member["answers"][2] == {
        "id": 3,
        "ok": False,
        "error": denied.format("attach"),
        "code": "denied",
    }
    assert member["answers"][3]["error"] == denied.format("reload")
    assert [a["ok"] for a in primary["answers"]] == [True, False]
    assert watcher["answers"] == [{"id": 5, "ok": True, "result": {"subscribed": True}}]
    assert stranger == {"connect_errno": 13}
    assert refused_before == 0
    # Only what was allowed reached the daemon.
    assert sorted(handler.calls) == ["list", "monitor", "status", "status"]


async def test_the_daemons_own_user_and_root_may_do_everything(public_dir: Path) -> None:
    # owner_uid stands for the daemon's user (nobody, here); root is allowed on top of it.
    path = public_dir / "control.sock"
    handler = Handler()
    async with trio.open_nursery() as nursery:
        server = ControlServer(handler, ControlSettings(path), owner_uid=NOBODY)
        await nursery.start(lambda task_status: server.serve(task_status=task_status))
        path.chmod(0o666)
        as_owner = await peer(path, [STATUS, ATTACH])
        stream = await trio.open_unix_socket(str(path))  # this process: root
        async with stream:
            await stream.send_all(json.dumps(RELOAD).encode() + b"\n")
            as_root = json.loads(await stream.receive_some(65536))
        nursery.cancel_scope.cancel()
    assert [a["ok"] for a in as_owner["answers"]] == [True, True]
    assert as_root == {"id": 4, "ok": True, "result": {}}
    assert handler.calls == ["status", "attach", "reload"]
