"""Owner and group names resolved inside real containers, mapped to host ids.

The container's /etc/passwd and /etc/group are read through its own root; a symlink
that points at a host path is resolved inside the container (where it leads nowhere),
and a magic link through /proc is refused: the host's files are never read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrelay.core.accounts import UnknownAccountError
from hotrelay.runtimes.lxc import LxcAdapter
from hotrelay.runtimes.lxd import LxdAdapter
from hotrelay.runtimes.names import AccountFileError, resolve_owner, resolve_owner_async
from hotrelay.testing.containers import (
    DIALOUT_GID,
    LxcContainer,
    LxcHost,
    LxdEngine,
    SessionDirs,
)

pytestmark = pytest.mark.privileged


@pytest.fixture
def lxc_container(
    lxc_host: LxcHost, runtime_dirs: SessionDirs, request: pytest.FixtureRequest
) -> Iterator[LxcContainer]:
    container = lxc_host.create(runtime_dirs.name("ln"), unprivileged=bool(request.param))
    container.start()
    yield container
    container.destroy()


@pytest.mark.parametrize("lxc_container", [True], indirect=True, ids=["unprivileged"])
async def test_names_map_through_the_lxc_idmap(
    lxc_host: LxcHost, lxc_container: LxcContainer
) -> None:
    [ref] = await LxcAdapter([lxc_host.lxcpath]).resolve(lxc_container.name)
    owner = await resolve_owner_async(ref, user="hruser", group="dialout")
    assert (owner.uid, owner.gid) == (1000, DIALOUT_GID)
    assert (owner.host_uid, owner.host_gid) == (101000, 100000 + DIALOUT_GID)
    root = resolve_owner(ref)  # the defaults: root:root
    assert (root.host_uid, root.host_gid) == (100000, 100000)
    with pytest.raises(UnknownAccountError, match="no group 'uucp'"):
        resolve_owner(ref, group="uucp")


async def test_names_map_through_the_lxd_idmap(
    lxd_engine: LxdEngine, runtime_dirs: SessionDirs
) -> None:
    name = runtime_dirs.name("xn")
    lxd_engine.launch(name)
    try:
        [ref] = await LxdAdapter([lxd_engine.socket]).resolve(name)
        owner = await resolve_owner_async(ref, group="dialout")
        assert (owner.gid, owner.host_gid) == (DIALOUT_GID, 100000 + DIALOUT_GID)
    finally:
        lxd_engine.cli("delete", "--force", name)


@pytest.mark.parametrize("lxc_container", [False], indirect=True, ids=["privileged"])
async def test_group_symlink_pointing_outside_the_root_is_refused(
    lxc_host: LxcHost, lxc_container: LxcContainer, tmp_path: Path
) -> None:
    host_group = tmp_path / "host-group"
    host_group.write_text("hostonly:x:4242:\ndialout:x:777:\n")
    [ref] = await LxcAdapter([lxc_host.lxcpath]).resolve(lxc_container.name)
    group_file = lxc_container.path / "rootfs" / "etc" / "group"
    assert resolve_owner(ref, group="dialout").gid == DIALOUT_GID

    group_file.unlink()
    group_file.symlink_to(host_group)  # absolute: the host's path, not the container's
    for walk in (False, True):
        with pytest.raises(AccountFileError, match="never on the host"):
            resolve_owner(ref, group="hostonly", walk=walk)

    group_file.unlink()
    group_file.symlink_to("../../../../../../../.." + str(host_group))  # .. clamps at /
    with pytest.raises(AccountFileError, match="never on the host"):
        resolve_owner(ref, group="dialout")

    group_file.unlink()
    group_file.symlink_to("/proc/1/root" + str(host_group))  # a magic link
    with pytest.raises(AccountFileError, match="magic link"):
        resolve_owner(ref, group="hostonly")
