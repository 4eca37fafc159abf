"""Reading files inside a container root without ever leaving it (no root needed).

Each case runs twice: through openat2(RESOLVE_IN_ROOT) and through the portable
component walk used on kernels without openat2; both must agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrelay.runtimes.names import AccountFileError, _read_account_file, read_file_in_root


@pytest.fixture(params=[False, True], ids=["openat2", "walk"])
def walk(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A fake container root, plus a 'host' file next to it that must stay unreachable."""
    container = tmp_path / "rootfs"
    (container / "etc").mkdir(parents=True)
    (container / "etc" / "group").write_text("dialout:x:20:\n")
    (tmp_path / "host-group").write_text("hostonly:x:4242:\n")
    fd = os.open(container, os.O_PATH | os.O_DIRECTORY)
    try:
        yield container, fd
    finally:
        os.close(fd)


def read(root_fd: int, path: str, walk: bool, **kwargs: int) -> str:
    return read_file_in_root(root_fd, path, walk=walk, **kwargs).decode()


def test_plain_file(root: tuple[Path, int], walk: bool) -> None:
    assert read(root[1], "etc/group", walk) == "dialout:x:20:\n"


def test_absolute_symlink_is_resolved_inside_the_root(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    (container / "srv").mkdir()
    (container / "srv" / "group").write_text("inside:x:7:\n")
    (container / "etc" / "group").unlink()
    (container / "etc" / "group").symlink_to("/srv/group")
    assert read(fd, "etc/group", walk) == "inside:x:7:\n"


def test_symlink_to_a_host_path_is_not_followed_out(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    host_file = container.parent / "host-group"
    (container / "etc" / "group").unlink()
    (container / "etc" / "group").symlink_to(host_file)  # absolute host path
    with pytest.raises(AccountFileError, match="No such file"):
        read(fd, "etc/group", walk)
    with pytest.raises(AccountFileError, match="never on the host"):
        _read_account_file(fd, "etc/group", walk)


def test_dot_dot_is_clamped_at_the_root(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    (container / "etc" / "group").unlink()
    # From inside the root, ../../../host-group is /host-group, which does not exist;
    # from the host it would be the host's file.
    (container / "etc" / "group").symlink_to("../../../../host-group")
    with pytest.raises(AccountFileError, match="No such file"):
        read(fd, "etc/group", walk)
    (container / "host-group").write_text("clamped:x:1:\n")
    assert read(fd, "etc/group", walk) == "clamped:x:1:\n"


def test_symlinked_directory_component(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    os.rename(container / "etc", container / "config")
    (container / "etc").symlink_to("/config")
    assert read(fd, "etc/group", walk) == "dialout:x:20:\n"


def test_fifo_is_refused_without_blocking(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    (container / "etc" / "group").unlink()
    os.mkfifo(container / "etc" / "group")
    with pytest.raises(AccountFileError, match="not a regular file"):
        read(fd, "etc/group", walk)


def test_huge_file_is_refused(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    (container / "etc" / "group").write_text("x" * 5000)
    with pytest.raises(AccountFileError, match="over the 4096 byte limit"):
        read(fd, "etc/group", walk, limit=4096)


def test_symlink_loop(root: tuple[Path, int], walk: bool) -> None:
    container, fd = root
    (container / "etc" / "group").unlink()
    (container / "etc" / "group").symlink_to("/etc/group")
    with pytest.raises(AccountFileError, match="symlink loop"):
        read(fd, "etc/group", walk)


def test_missing_file_reads_as_empty(root: tuple[Path, int], walk: bool) -> None:
    assert _read_account_file(root[1], "etc/passwd", walk) == ""
