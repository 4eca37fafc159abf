"""pytest fixtures for real container engines; tests/conftest.py loads this as a plugin.

Engines are expensive, so each starts once per test session, on first use, and is torn
down completely at the end of the session, even after failures: containers deleted,
daemons stopped by the pid this harness started, mounts undone, directories removed,
every process reaped. Tests create their own containers (names from
``runtime_dirs.name(prefix)``) and should remove them; the engine's teardown catches
the rest.

Fixtures are synchronous (pytest-trio runs them around trio tests too). Without root,
or without the runtime installed, they skip; under HOTRELAY_REQUIRE_PRIVILEGED=1 that
skip fails the test (tests/conftest.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from hotrelay.testing.containers import (
    BusyboxRootfs,
    DockerEngine,
    EngineError,
    LxcHost,
    LxdEngine,
    PodmanEngine,
    RuncRoot,
    SessionDirs,
)

Engine = TypeVar("Engine", LxcHost, DockerEngine, LxdEngine, RuncRoot, PodmanEngine)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("container engines need root")


@pytest.fixture(scope="session")
def runtime_dirs() -> Iterator[SessionDirs]:
    """Private directories for this session's engines (removed at the end)."""
    _require_root()
    dirs = SessionDirs()
    try:
        yield dirs
    finally:
        dirs.close()


@pytest.fixture(scope="session")
def busybox_rootfs(runtime_dirs: SessionDirs) -> BusyboxRootfs:
    """A static busybox root filesystem (busybox-static), copied for each container."""
    try:
        return BusyboxRootfs(runtime_dirs.base)
    except EngineError as exc:
        pytest.skip(str(exc))


def _engine(
    factory: Callable[[SessionDirs, BusyboxRootfs], Engine],
    dirs: SessionDirs,
    rootfs: BusyboxRootfs,
) -> Iterator[Engine]:
    try:
        engine = factory(dirs, rootfs)
    except EngineError as exc:
        if "not installed" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def lxc_host(runtime_dirs: SessionDirs, busybox_rootfs: BusyboxRootfs) -> Iterator[LxcHost]:
    """A private lxcpath; ``create(name, unprivileged=...)`` makes busybox containers."""
    yield from _engine(LxcHost, runtime_dirs, busybox_rootfs)


@pytest.fixture(scope="session")
def docker_engine(
    runtime_dirs: SessionDirs, busybox_rootfs: BusyboxRootfs
) -> Iterator[DockerEngine]:
    """A private dockerd (no bridge, no iptables) with a busybox image imported."""
    yield from _engine(DockerEngine, runtime_dirs, busybox_rootfs)


@pytest.fixture(scope="session")
def lxd_engine(runtime_dirs: SessionDirs, busybox_rootfs: BusyboxRootfs) -> Iterator[LxdEngine]:
    """A private LXD (own LXD_DIR), dir pool, no network, a busybox image."""
    yield from _engine(LxdEngine, runtime_dirs, busybox_rootfs)


@pytest.fixture(scope="session")
def runc_root(runtime_dirs: SessionDirs, busybox_rootfs: BusyboxRootfs) -> Iterator[RuncRoot]:
    """A private runc root; ``run_container(id)`` starts a busybox bundle."""
    yield from _engine(RuncRoot, runtime_dirs, busybox_rootfs)


@pytest.fixture(scope="session")
def podman_engine(
    runtime_dirs: SessionDirs, busybox_rootfs: BusyboxRootfs
) -> Iterator[PodmanEngine]:
    """Podman on private storage, runc, cgroupfs, file events, no network."""
    yield from _engine(PodmanEngine, runtime_dirs, busybox_rootfs)
