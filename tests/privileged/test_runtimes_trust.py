"""A runtime's claim that a container runs is believed only from state only root can write.

systemd-nspawn: machined's files name each machine's LEADER; a file someone else owns
or can write, or a directory anyone can write into, names nothing. LXC: the pieces of
the check of a claimed init that do not need a real container (the socket name LXC
derives, the idmap read from the config file and what it includes, and who may own
those files); test_lxc_monitor_spoof.py runs the whole check against an impostor.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrelay.runtimes.lxc import ClaimRefused, command_socket_name, read_config_idmap
from hotrelay.runtimes.nspawn import NspawnAdapter

pytestmark = pytest.mark.privileged

NOBODY = 65534


@pytest.fixture
def leader() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "600"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait(10)


def machine_file(machines: Path, name: str, leader: int) -> Path:
    path = machines / name
    path.write_text(f"NAME={name}\nLEADER={leader}\nCLASS=container\n")
    path.chmod(0o644)
    return path


async def test_nspawn_believes_only_root_owned_unwritable_files(
    tmp_path: Path, leader: int, caplog: pytest.LogCaptureFixture
) -> None:
    machines = tmp_path / "machines"
    machines.mkdir(mode=0o755)
    machine_file(machines, "good", leader)
    machine_file(machines, "planted", leader)
    os.chown(machines / "planted", NOBODY, NOBODY)  # another user wrote it
    machine_file(machines, "editable", leader).chmod(0o666)  # anyone may change LEADER
    machine_file(machines, "groupw", leader).chmod(0o664)
    adapter = NspawnAdapter(machines)

    assert [ref.name for ref in await adapter.list_running()] == ["good"]
    for name in ("planted", "editable", "groupw"):
        assert await adapter.resolve(name) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("planted is not machined's (owned by uid 65534" in w for w in warnings), warnings
    assert any("editable is not machined's" in w and "mode 666" in w for w in warnings)
    # Warned once per file, however often it is looked at.
    await adapter.list_running()
    again = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(again) == len(warnings)


async def test_nspawn_ignores_a_directory_others_can_write(tmp_path: Path, leader: int) -> None:
    machines = tmp_path / "machines"
    machines.mkdir()
    machine_file(machines, "good", leader)
    machines.chmod(0o777)  # anyone could have put "good" there
    assert await NspawnAdapter(machines).list_running() == []
    machines.chmod(0o755)
    os.chown(machines, NOBODY, NOBODY)
    assert await NspawnAdapter(machines).list_running() == []
    os.chown(machines, 0, 0)
    assert [r.name for r in await NspawnAdapter(machines).list_running()] == ["good"]


def test_lxc_command_socket_name() -> None:
    assert command_socket_name("/var/lib/lxc", "web") == "/var/lib/lxc/web/command"
    # Too long for a socket address: LXC hashes LXCPATH/NAME with FNV-1a 64 (checked
    # against a real LXC 5.0.2 container with a 90-character lxcpath while writing this).
    long_path = "/" + "x" * 100
    name = command_socket_name(long_path, "c")
    assert name.startswith("lxc/")
    assert name.endswith("/command")
    assert len(name) == 28
    digest = 0xCBF29CE484222325
    for byte in f"{long_path}/c".encode():
        digest = ((digest ^ byte) * 0x100000001B3) % 2**64
    assert name == f"lxc/{digest:016x}/command"


def test_lxc_idmap_comes_from_trusted_config_files(tmp_path: Path) -> None:
    owners = frozenset({0})
    common = tmp_path / "common.conf.d"
    common.mkdir(mode=0o755)
    (common / "10-map.conf").write_text("lxc.idmap = g 0 200000 65536\n")
    config = tmp_path / "config"
    config.write_text(
        "lxc.idmap = u 0 1 1\n"
        "lxc.idmap =\n"  # clears what came before, as LXC does
        "lxc.idmap = u 0 200000 65536\n"
        f"lxc.include = {common}\n"
    )
    assert read_config_idmap(config, owners) == ["u 0 200000 65536", "g 0 200000 65536"]
    (common / "10-map.conf").chmod(0o666)
    with pytest.raises(ClaimRefused, match=r"10-map\.conf is owned by uid 0 with mode 666"):
        read_config_idmap(config, owners)
    (common / "10-map.conf").chmod(0o644)
    os.chown(config, NOBODY, NOBODY)
    with pytest.raises(ClaimRefused, match="owned by uid 65534"):
        read_config_idmap(config, owners)
    assert read_config_idmap(config, frozenset({0, NOBODY}))  # the lxcpath's owner's own
