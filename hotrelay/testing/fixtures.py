"""pytest fixtures for real kernel objects; tests/conftest.py loads this as a plugin.

All fixtures are synchronous (pytest-trio runs them around trio tests too) and
tear down what they made even when the test fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from hotrelay.testing.hotplug import VethPair, ZramDevice
from hotrelay.testing.sandbox import DeviceMode, IdMap, Sandbox


class SandboxFactory(Protocol):
    def __call__(
        self,
        *,
        userns: IdMap | None = None,
        devices: DeviceMode = "default-deny",
        name_prefix: str | None = None,
    ) -> Sandbox: ...


class ZramFactory(Protocol):
    def __call__(self, *, disksize: str | None = "1M") -> ZramDevice: ...


def _close_all(closers: list[Callable[[], None]]) -> None:
    """Close newest first, trying every one even if some fail, then report."""
    errors: list[Exception] = []
    for close in reversed(closers):
        try:
            close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise ExceptionGroup("teardown failed", errors)


@pytest.fixture
def make_sandbox(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """Factory for sandboxes; all of them are closed at teardown."""
    created: list[Sandbox] = []
    # Named after the test, so a leftover cgroup says where it came from.
    default_prefix = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:32]

    def factory(
        *,
        userns: IdMap | None = None,
        devices: DeviceMode = "default-deny",
        name_prefix: str | None = None,
    ) -> Sandbox:
        sandbox = Sandbox.create(
            userns=userns, devices=devices, name_prefix=name_prefix or default_prefix
        )
        created.append(sandbox)
        return sandbox

    try:
        yield factory
    finally:
        _close_all([sandbox.close for sandbox in created])


@pytest.fixture
def sandbox(make_sandbox: SandboxFactory) -> Sandbox:
    """A privileged sandbox (no user namespace) with the OCI default device whitelist."""
    return make_sandbox()


@pytest.fixture
def make_zram() -> Iterator[ZramFactory]:
    """Factory for hot-added zram devices; all are hot-removed at teardown."""
    created: list[ZramDevice] = []

    def factory(*, disksize: str | None = "1M") -> ZramDevice:
        device = ZramDevice(disksize=disksize)
        # Registered before add(): a half-added device is still removed.
        created.append(device)
        return device.add()

    try:
        yield factory
    finally:
        _close_all([device.remove for device in created])


@pytest.fixture
def zram(make_zram: ZramFactory) -> ZramDevice:
    return make_zram()


@pytest.fixture
def veth() -> Iterator[VethPair]:
    with VethPair() as pair:
        yield pair
