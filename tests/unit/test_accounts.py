"""Container accounts: /etc/passwd and /etc/group parsing, name lookup, id mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotrelay.core.accounts import (
    Accounts,
    GroupEntry,
    IdKind,
    UnknownAccountError,
    UnmappedIdError,
    UserEntry,
    parse_group,
    parse_passwd,
    to_host_id,
)
from hotrelay.core.containers import IdMap

DEBIAN_PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
homeassistant:x:1000:1000:Home Assistant,,,:/home/ha:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
DEBIAN_GROUP = """\
root:x:0:
dialout:x:20:homeassistant,pi
plugdev:x:46:
homeassistant:x:1000:
"""


def test_passwd_entries_in_file_order() -> None:
    users = parse_passwd(DEBIAN_PASSWD)
    assert [u.name for u in users] == ["root", "daemon", "homeassistant", "nobody"]
    assert users[2] == UserEntry("homeassistant", 1000, 1000, "/home/ha", "/bin/bash")


def test_group_entries_with_members() -> None:
    groups = parse_group(DEBIAN_GROUP)
    assert groups[1] == GroupEntry("dialout", 20, ("homeassistant", "pi"))
    assert groups[2] == GroupEntry("plugdev", 46, ())


@pytest.mark.parametrize(
    "line",
    [
        "# a comment:x:0:0",
        "+nisuser::::::",
        "-excluded:x:5:5::/:/bin/sh",
        "",
        "short:x:1",
        "notanumber:x:abc:0::/:/bin/sh",
        "negative:x:-1:0::/:/bin/sh",
        "toolarge:x:4294967295:0::/:/bin/sh",
        ":x:7:7::/:/bin/sh",
        "with space:x:8:8::/:/bin/sh",
    ],
)
def test_unparsable_passwd_lines_are_skipped(line: str) -> None:
    expected = (UserEntry("ok", 9, 9, "/", "/bin/sh"),)
    assert parse_passwd(f"{line}\nok:x:9:9::/:/bin/sh\n") == expected


def test_first_entry_for_a_name_wins_like_glibc() -> None:
    accounts = Accounts.parse("", "dialout:x:20:\ndialout:x:99:\n")
    assert accounts.gid("dialout") == 20


def test_lookup_by_name_and_by_number() -> None:
    accounts = Accounts.parse(DEBIAN_PASSWD, DEBIAN_GROUP)
    assert accounts.uid("homeassistant") == 1000
    assert accounts.uid("root") == 0
    assert accounts.gid("dialout") == 20
    assert accounts.gid("46") == 46
    assert accounts.uid(4242) == 4242  # a number need not exist in the file


def test_unknown_name_says_which_file_and_where() -> None:
    accounts = Accounts.parse(DEBIAN_PASSWD, DEBIAN_GROUP, where="lxc:ha")
    with pytest.raises(UnknownAccountError, match=r"no group 'uucp' in /etc/group in lxc:ha"):
        accounts.gid("uucp")
    with pytest.raises(UnknownAccountError, match=r"no user 'pi' in /etc/passwd"):
        accounts.uid("pi")


def test_out_of_range_numeric_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        Accounts().uid(-1)


def test_mapping_to_host_ids_through_a_user_namespace() -> None:
    id_map = IdMap.parse("0 100000 65536\n")
    assert to_host_id(id_map, 20, IdKind.GROUP) == 100020
    assert to_host_id(IdMap(), 20, IdKind.GROUP) == 20  # no user namespace
    with pytest.raises(UnmappedIdError, match="group id 70000 is not mapped"):
        to_host_id(id_map, 70000, IdKind.GROUP)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=12).filter(
    lambda n: n[0] not in "+-"
)
ids = st.integers(min_value=0, max_value=4294967294)


@given(st.lists(st.tuples(names, ids, ids), max_size=20))
def test_rendered_passwd_parses_back(entries: list[tuple[str, int, int]]) -> None:
    text = "".join(f"{n}:x:{u}:{g}:gecos:/home/{n}:/bin/sh\n" for n, u, g in entries)
    parsed = parse_passwd(text)
    assert [(u.name, u.uid, u.gid) for u in parsed] == entries


@given(st.text(max_size=300))
def test_parsers_never_raise_on_garbage(text: str) -> None:
    parse_passwd(text)
    parse_group(text)
