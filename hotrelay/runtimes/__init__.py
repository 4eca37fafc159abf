"""Runtime adapters: from a rule's ``RUNTIME:NAME`` to live containers, and their lifecycle.

One adapter per runtime (see docs/runtimes.md). Each offers ``resolve(name_glob)``,
``list_running()``, ``lookup(name)``, ``watch(send_channel, task_status=...)`` emitting
:class:`~hotrelay.core.containers.ContainerStarted` / ``ContainerStopped``, and
``resync()``. A runtime that is not installed or not running is skipped with one log
line; a container that vanishes during a lookup is simply not running.
"""

from __future__ import annotations

from hotrelay.core.containers import Runtime
from hotrelay.runtimes.base import Adapter, Watcher
from hotrelay.runtimes.docker import DockerAdapter
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError, RuntimeUnavailable
from hotrelay.runtimes.lxc import LxcAdapter
from hotrelay.runtimes.lxd import IncusAdapter, LxdAdapter
from hotrelay.runtimes.nspawn import NspawnAdapter
from hotrelay.runtimes.oci import OciAdapter
from hotrelay.runtimes.podman import PodmanAdapter
from hotrelay.runtimes.raw import CgroupAdapter, PidAdapter

__all__ = [
    "ADAPTER_CLASSES",
    "Adapter",
    "CgroupAdapter",
    "ContainerGone",
    "DockerAdapter",
    "IncusAdapter",
    "LxcAdapter",
    "LxdAdapter",
    "NspawnAdapter",
    "OciAdapter",
    "PidAdapter",
    "PodmanAdapter",
    "RuntimeApiError",
    "RuntimeUnavailable",
    "Watcher",
    "default_adapters",
]

ADAPTER_CLASSES: dict[Runtime, type[Adapter]] = {
    Runtime.LXC: LxcAdapter,
    Runtime.INCUS: IncusAdapter,
    Runtime.LXD: LxdAdapter,
    Runtime.DOCKER: DockerAdapter,
    Runtime.PODMAN: PodmanAdapter,
    Runtime.RUNC: OciAdapter,
    Runtime.NSPAWN: NspawnAdapter,
    Runtime.PID: PidAdapter,
    Runtime.CGROUP: CgroupAdapter,
}


def default_adapters() -> dict[Runtime, Adapter]:
    """One adapter per runtime, looking where each runtime lives by default."""
    return {runtime: cls() for runtime, cls in ADAPTER_CLASSES.items()}
