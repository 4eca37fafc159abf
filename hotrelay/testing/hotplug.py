"""Real hotplug events from the kernel: zram block devices, veth pairs, synthetic uevents.

Each generator is a context manager that removes what it added, even when the test
fails, and never touches objects it did not create (zram0 may belong to the host).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import sys
import time
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

ZRAM_CONTROL = Path("/sys/class/zram-control")
SYNTH_ACTIONS = frozenset(
    {"add", "remove", "change", "move", "online", "offline", "bind", "unbind"}
)
# The kernel accepts only alphanumeric keys and non-empty values, and it rejects
# anything else by logging to dmesg while the write() still succeeds: check here.
_SYNTH_WORD = re.compile(r"[A-Za-z0-9]+")


def _read_once(path: Path) -> str:
    """One read(2): reading zram-control/hot_add creates a device on every open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def _write_once(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class ZramDevice:
    """A zram block device hot-added for the test and hot-removed afterwards."""

    def __init__(self, *, disksize: str | None = "1M") -> None:
        # With a disksize the device has sectors, so reading 4096 bytes works.
        self.disksize = disksize
        self._index: int | None = None
        self.major = -1
        self.minor = -1

    def add(self) -> ZramDevice:
        if self._index is not None:
            raise RuntimeError(f"{self.name} already added")
        self._index = int(_read_once(ZRAM_CONTROL / "hot_add"))
        try:
            major, minor = _read_once(Path("/sys/block", self.name, "dev")).split(":")
            self.major, self.minor = int(major), int(minor)
            if self.disksize is not None:
                _write_once(Path("/sys/block", self.name, "disksize"), self.disksize)
        except BaseException:
            self.remove()
            raise
        return self

    @property
    def index(self) -> int:
        if self._index is None:
            raise RuntimeError("zram device not added yet")
        return self._index

    @property
    def name(self) -> str:
        return f"zram{self.index}"

    @property
    def devnode(self) -> Path:
        return Path("/dev", self.name)

    @property
    def devnum(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def syspath(self) -> Path:
        return Path("/sys/devices/virtual/block", self.name)

    @property
    def devpath(self) -> str:
        """DEVPATH as uevents carry it."""
        return f"/devices/virtual/block/{self.name}"

    @property
    def present(self) -> bool:
        return self._index is not None and Path("/sys/block", self.name).exists()

    def remove(self, *, timeout: float = 2.0) -> None:
        """Hot-remove; idempotent. Retries while the device is busy (still open)."""
        if not self.present:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                _write_once(ZRAM_CONTROL / "hot_remove", str(self.index))
                return
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __enter__(self) -> ZramDevice:
        return self.add()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        where = self.name if self._index is not None else "not added"
        return f"<ZramDevice {where} {self.major}:{self.minor}>"


class VethPair:
    """A veth pair with fresh names in the host netns; no addresses, no bridge."""

    def __init__(self, *, prefix: str = "hrt") -> None:
        stem = f"{prefix}{secrets.token_hex(4)}"
        if len(stem) + 1 > 15:  # IFNAMSIZ - 1
            raise ValueError(f"prefix {prefix!r} too long for an interface name")
        self.name = f"{stem}a"
        self.peer_name = f"{stem}b"
        self.index = -1
        self.peer_index = -1

    def add(self) -> VethPair:
        from pyroute2 import IPRoute  # slow import; only tests that plug NICs pay for it

        with IPRoute() as ipr:
            ipr.link("add", ifname=self.name, kind="veth", peer=self.peer_name)
            try:
                self.index = ipr.link_lookup(ifname=self.name)[0]
                self.peer_index = ipr.link_lookup(ifname=self.peer_name)[0]
            except BaseException:
                self._delete(ipr)
                raise
        return self

    def delete(self) -> None:
        """Delete the pair if either end is still in the host netns; idempotent."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            self._delete(ipr)

    def _delete(self, ipr: Any) -> None:
        # Deleting one end takes the other with it, wherever it has been moved.
        for ifname in (self.name, self.peer_name):
            indexes = ipr.link_lookup(ifname=ifname)
            if indexes:
                ipr.link("del", index=indexes[0])
                return

    @property
    def present(self) -> bool:
        return (
            Path("/sys/class/net", self.name).exists()
            or Path("/sys/class/net", self.peer_name).exists()
        )

    def __enter__(self) -> VethPair:
        return self.add()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"<VethPair {self.name}({self.index}) {self.peer_name}({self.peer_index})>"


def synthetic_uevent_text(
    action: str, *, uuid: str | None = None, args: Mapping[str, str] | None = None
) -> str:
    """What to write to a sysfs uevent file; the kernel needs a UUID before any args."""
    if action not in SYNTH_ACTIONS:
        raise ValueError(f"{action!r} is not a uevent action ({', '.join(sorted(SYNTH_ACTIONS))})")
    fields = [action]
    if args and uuid is None:
        uuid = str(uuidlib.uuid4())
    if uuid is not None:
        fields.append(str(uuidlib.UUID(uuid)))
    for key, value in (args or {}).items():
        if not _SYNTH_WORD.fullmatch(key) or not _SYNTH_WORD.fullmatch(value):
            raise ValueError(
                f"synthetic uevent argument {key}={value!r}: the kernel takes only "
                "alphanumeric keys and non-empty alphanumeric values"
            )
        fields.append(f"{key}={value}")
    return " ".join(fields)


def write_synthetic_uevent(
    syspath: str | os.PathLike[str],
    action: str,
    *,
    uuid: str | None = None,
    args: Mapping[str, str] | None = None,
) -> str | None:
    """Make the kernel emit a uevent for the device at syspath.

    The kernel adds SYNTH_UUID (or "0") and turns each arg into SYNTH_ARG_KEY=VALUE.
    Returns the UUID used, generated when args are given without one.
    """
    text = synthetic_uevent_text(action, uuid=uuid, args=args)
    _write_once(Path(syspath, "uevent"), text)
    fields = text.split(" ")
    return fields[1] if len(fields) > 1 else None


def emit_synthetic_burst(
    syspath: str | os.PathLike[str], count: int, action: str = "change"
) -> float:
    """Write count synthetic uevents as fast as possible; returns the seconds it took.

    Meant to run in its own process (``python -m hotrelay.testing.hotplug burst``)
    so the emitter does not share a CPU slice with the receiver being measured.
    """
    payload = synthetic_uevent_text(action).encode()
    fd = os.open(Path(syspath, "uevent"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.pwrite(fd, payload, 0)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[0] != "burst":
        print("usage: python -m hotrelay.testing.hotplug burst SYSPATH COUNT [ACTION]")
        return 2
    count = int(argv[2])
    seconds = emit_synthetic_burst(argv[1], count, *argv[3:])
    print(json.dumps({"count": count, "seconds": seconds, "rate": count / seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
