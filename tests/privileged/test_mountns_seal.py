"""The one child that joins a container's mount namespace can reach no file.

``mountns`` forks a child for each mount operation; after it joins the container's
mount namespace its root is an empty, read-only tmpfs and its import machinery,
codec search and hooks are gone. Here real children join a real sandbox's mount
namespace and try what CPython might do on its own there: open a file by its
absolute path, import a module, look up a codec. Every attempt finds nothing; the
child's exit status says so.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotrelay.effectors.nshelper import mountns
from hotrelay.kernel import ns
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged


@pytest.fixture(params=[None, IdMap(0, 100000, 65536)], ids=["privileged", "userns"])
def box(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with Sandbox.create(userns=request.param, name_prefix="seal") as sandbox:
        yield sandbox


def run_inside(box: Sandbox, operation: Callable[[], object]) -> None:
    mnt = ns.open_namespace(box.pid, "mnt")
    empty = mountns.empty_root()
    try:
        mountns._run(mnt, empty, operation, timeout=5.0)
    finally:
        os.close(mnt)
        os.close(empty)


def test_an_absolute_path_finds_nothing(box: Sandbox) -> None:
    # The container has /etc; the child must not see it, nor anything else.
    assert (box.root / "etc").is_dir() or Path(f"/proc/{box.pid}/root/bin").exists()
    with pytest.raises(OSError, match="No such file") as caught:
        run_inside(box, lambda: os.stat("/etc"))
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(OSError, match="No such file") as caught:
        run_inside(box, lambda: os.stat(os.__file__))
    assert caught.value.errno == errno.ENOENT


def test_the_root_is_empty_and_read_only(box: Sandbox) -> None:
    def listing() -> None:
        if os.listdir("/"):
            raise OSError(errno.ENOTEMPTY, "root not empty")
        os.mkdir("/planted")

    with pytest.raises(OSError, match="Read-only") as caught:
        run_inside(box, listing)
    assert caught.value.errno == errno.EROFS


def test_no_import_and_no_codec_lookup(box: Sandbox) -> None:
    def imports() -> None:
        __import__("this_module_is_not_loaded_yet_xyz")

    def codec() -> None:
        b"x".decode("cp037")  # not a built-in fast path: needs the codec search

    for operation in (imports, codec):
        with pytest.raises(OSError, match="child failed") as caught:
            run_inside(box, operation)
        assert caught.value.errno == errno.EIO  # not an OSError: the fixed "failed" status


def test_a_signal_runs_no_python_handler(box: Sandbox) -> None:
    def interrupted() -> None:
        os.kill(os.getpid(), 2)  # SIGINT: blocked, so no KeyboardInterrupt, no traceback
        os.stat("/nothing-here")

    with pytest.raises(OSError, match="No such file") as caught:
        run_inside(box, interrupted)
    assert caught.value.errno == errno.ENOENT
