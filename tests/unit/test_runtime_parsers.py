"""The runtime adapters' parsers, on the exact text and JSON each runtime produces."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotrelay.core.containers import ContainerRef, IdMap, Runtime
from hotrelay.core.device_access import Access, DeviceRule, DeviceType
from hotrelay.runtimes.engine_json import names_in_event, ref_from_inspect, refs_from_summaries
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError
from hotrelay.runtimes.lxc import LxcAdapter, parse_config_items, parse_idmap_items
from hotrelay.runtimes.lxd import LxdAdapter, _join_name, _split_name
from hotrelay.runtimes.nspawn import parse_machine_file
from hotrelay.runtimes.oci import device_rule_from_libcontainer, parse_state
from hotrelay.runtimes.podman import PodmanAdapter
from hotrelay.runtimes.procfs import parse_cgroup_file, parse_stat_start_time
from hotrelay.runtimes.raw import _normalize

# -- procfs -----------------------------------------------------------------------------

STAT = (
    "6991 (init) S 6990 6991 6991 0 -1 4194560 640 1243 0 0 0 0 0 0 20 0 1 0 "
    "80077 2813952 168 18446744073709551615 4194304 5100321 140722 0 0 0 0 "
)


def test_start_time_is_field_22() -> None:
    assert parse_stat_start_time(STAT) == 80077


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=16))
def test_start_time_survives_any_comm(comm: str) -> None:
    # comm may contain spaces and ')' (a process can name itself anything).
    text = STAT.replace("(init)", f"({comm})")
    assert parse_stat_start_time(text) == 80077


def test_start_time_rejects_truncated_stat() -> None:
    with pytest.raises(ValueError, match="unexpected"):
        parse_stat_start_time("12 (x) S 1 2")


def test_cgroup_file_hybrid_host() -> None:
    text = (
        "9:name=systemd:/lxc.payload.c1\n8:pids:/lxc.payload.c1\n"
        "5:devices:/lxc.payload.c1\n4:memory:/lxc.payload.c1\n"
        "2:cpu,cpuacct:/lxc.payload.c1\n0::/lxc.payload.c1\n"
    )
    assert parse_cgroup_file(text) == ("/lxc.payload.c1", "/lxc.payload.c1")


def test_cgroup_file_pure_v2_and_pure_v1() -> None:
    assert parse_cgroup_file("0::/system.slice/docker-ab.scope\n") == (
        None,
        "/system.slice/docker-ab.scope",
    )
    assert parse_cgroup_file("3:devices:/docker/ab\n1:name=systemd:/docker/ab\n") == (
        "/docker/ab",
        None,
    )


def test_cgroup_path_with_colons_is_kept_whole() -> None:
    assert parse_cgroup_file("0::/a:b/c\n") == (None, "/a:b/c")


# -- LXC --------------------------------------------------------------------------------

LXC_INFO_C = """\
lxc.idmap = u 0 100000 65536
g 0 100000 65536
lxc.cgroup.devices.deny = a
lxc.cgroup.devices.allow = c 1:3 rwm
c 5:* rwm
lxc.cgroup2.devices.allow =
"""


def test_lxc_info_config_items_with_multi_values_and_unset_keys() -> None:
    keys = ("lxc.idmap", "lxc.cgroup.devices.deny", "lxc.cgroup.devices.allow")
    items = parse_config_items(LXC_INFO_C, (*keys, "lxc.cgroup2.devices.allow"))
    assert items == {
        "lxc.idmap": ["u 0 100000 65536", "g 0 100000 65536"],
        "lxc.cgroup.devices.deny": ["a"],
        "lxc.cgroup.devices.allow": ["c 1:3 rwm", "c 5:* rwm"],
        "lxc.cgroup2.devices.allow": [],
    }


def test_lxc_idmap_items() -> None:
    uid_map, gid_map = parse_idmap_items(["u 0 100000 65536", "g 0 200000 1000", "b 70000 7 1"])
    assert uid_map == IdMap.parse("0 100000 65536\n70000 7 1\n")
    assert gid_map == IdMap.parse("0 200000 1000\n70000 7 1\n")
    assert parse_idmap_items([]) == (IdMap(), IdMap())


def test_lxc_idmap_rejects_garbage() -> None:
    with pytest.raises(RuntimeApiError, match=r"not 'u\|g\|b"):
        parse_idmap_items(["x 0 1 2"])


def test_lxc_ls_fancy_rows() -> None:
    text = "NAME STATE   PID  \nc1   RUNNING 6991 \nc2   STOPPED -    \n"
    assert LxcAdapter._parse_ls(text) == [("c1", "RUNNING", "6991"), ("c2", "STOPPED", "-")]


# -- runc / OCI -------------------------------------------------------------------------


def test_libcontainer_device_rules() -> None:
    assert device_rule_from_libcontainer(
        {"type": 97, "major": -1, "minor": -1, "permissions": "rwm", "allow": False}
    ) == DeviceRule(DeviceType.ALL, None, None, Access(), allow=False)
    assert device_rule_from_libcontainer(
        {"type": 99, "major": 136, "minor": -1, "permissions": "rwm", "allow": True}
    ) == DeviceRule.parse("c 136:* rwm")
    assert device_rule_from_libcontainer(
        {"type": 98, "major": -1, "minor": -1, "permissions": "m", "allow": True}
    ) == DeviceRule.parse("b *:* m")


@pytest.mark.parametrize(
    "entry",
    [
        {"type": 120, "major": 1, "minor": 3, "permissions": "rwm", "allow": True},
        {"type": 99, "major": "1", "minor": 3, "permissions": "rwm", "allow": True},
        {"type": 99, "major": 1, "minor": 3, "permissions": "rwx", "allow": True},
        {"type": 99, "major": 1, "minor": 3, "permissions": "rwm", "allow": "yes"},
    ],
)
def test_libcontainer_device_rule_errors(entry: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        device_rule_from_libcontainer(entry)


DENY_ALL = {"type": 97, "major": -1, "minor": -1, "permissions": "rwm", "allow": False}
NULL = {"type": 99, "major": 1, "minor": 3, "permissions": "rwm", "allow": True}
TUN = {"type": 99, "major": 10, "minor": 200, "permissions": "rwm", "allow": True}


def test_runc_state_json() -> None:
    unknown_type = {**NULL, "type": 63}
    state = parse_state(
        {
            "id": "c1",
            "init_process_pid": 8220,
            "init_process_start": 80077,
            "config": {
                "cgroups": {
                    "devices": [DENY_ALL, NULL, unknown_type],
                }
            },
        },
        container_id="c1",
    )
    assert (state.id, state.pid, state.start_time) == ("c1", 8220, 80077)
    # The unknown type 63 ('?') is dropped with a warning, the rest kept in order.
    assert [r.render() for r in state.device_rules] == ["a *:* rwm", "c 1:3 rwm"]
    assert state.device_rules[0].allow is False


def test_runc_state_nested_resources_layout() -> None:
    state = parse_state(
        {
            "init_process_pid": 5,
            "config": {"cgroups": {"resources": {"devices": [TUN]}}},
        },
        container_id="x",
    )
    assert state.id == "x"
    assert state.start_time is None
    assert [r.render() for r in state.device_rules] == ["c 10:200 rwm"]


def test_runc_state_without_pid_is_rejected() -> None:
    with pytest.raises(ValueError, match="init_process_pid"):
        parse_state({"id": "x"}, container_id="x")


# -- machined ---------------------------------------------------------------------------

MACHINE_FILE = """\
# This is private data. Do not parse.
NAME=web
SCOPE=machine-web.scope
SERVICE=systemd-nspawn@web.service
ROOT=/var/lib/machines/web\\x20site
ID=1f3c0c4dd8e44b06a1e8e0c9a2b3c4d5
LEADER=4242
CLASS=container
REALTIME=1700000000000000
MONOTONIC=12345678
NETIF=3
"""


def test_machined_file() -> None:
    machine = parse_machine_file(MACHINE_FILE)
    assert machine["NAME"] == "web"
    assert machine["LEADER"] == "4242"
    assert machine["CLASS"] == "container"
    assert machine["ROOT"] == "/var/lib/machines/web site"


# -- LXD / Incus ------------------------------------------------------------------------


def test_lxd_project_names() -> None:
    assert _split_name("c1") == ("default", "c1")
    assert _split_name("web_c1") == ("web", "c1")
    assert _join_name("default", "c1") == "c1"
    assert _join_name("web", "c1") == "web_c1"


@pytest.mark.parametrize(
    ("event", "name"),
    [
        ({"type": "lifecycle", "metadata": {"action": "instance-started",
          "source": "/1.0/instances/c1"}, "project": "default"}, "c1"),
        ({"type": "lifecycle", "metadata": {"action": "instance-stopped",
          "source": "/1.0/instances/c1?project=web"}}, "web_c1"),
        ({"type": "lifecycle", "metadata": {"action": "instance-restarted",
          "source": "/1.0/instances/c%31"}, "project": "lab"}, "lab_c1"),
        ({"type": "lifecycle", "metadata": {"action": "image-created",
          "source": "/1.0/images/abc"}}, None),
        ({"type": "logging", "metadata": {"message": "hello"}}, None),
        ("not an object", None),
    ],
)  # fmt: skip
def test_lxd_lifecycle_event_names(event: object, name: str | None) -> None:
    assert LxdAdapter._name_in_event(event) == name


# -- Docker / Podman --------------------------------------------------------------------


def test_docker_event_names() -> None:
    event = {
        "status": "die",
        "id": "8dcb",
        "Type": "container",
        "Action": "die",
        "Actor": {"ID": "8dcb", "Attributes": {"exitCode": "137", "name": "dk1"}},
    }
    assert names_in_event(event) == ["dk1"]
    rename = {"Type": "container", "Action": "rename",
              "Actor": {"Attributes": {"name": "new", "oldName": "/old"}}}  # fmt: skip
    assert names_in_event(rename) == ["new", "old"]
    assert names_in_event({"Type": "network", "Actor": {}}) == []


def test_inspect_object_to_container() -> None:
    def rules(container_id: str, pid: int) -> tuple[DeviceRule, ...]:
        return (
            (DeviceRule.parse("c 1:3 rwm"),) if (container_id, pid) == ("8dcb", os.getpid()) else ()
        )

    running = {"Id": "8dcb", "Name": "/dk1", "State": {"Running": True, "Pid": os.getpid()}}
    ref = ref_from_inspect(Runtime.DOCKER, running, rules, "docker")
    assert ref is not None
    assert (ref.runtime, ref.name, ref.id, ref.pid) == (Runtime.DOCKER, "dk1", "8dcb", os.getpid())
    assert ref.base_device_rules == (DeviceRule.parse("c 1:3 rwm"),)
    stopped = {"Id": "8dcb", "Name": "/dk1", "State": {"Running": False, "Pid": 0}}
    assert ref_from_inspect(Runtime.DOCKER, stopped, rules, "docker") is None
    with pytest.raises(RuntimeApiError, match="podman: container inspect is not an object"):
        ref_from_inspect(Runtime.PODMAN, ["not", "an", "object"], rules, "podman")


async def test_summaries_skip_what_is_gone_or_malformed() -> None:
    async def inspect(name: str) -> ContainerRef | None:
        if name == "gone":
            raise ContainerGone(name)
        if name == "stopped":
            return None
        return ContainerRef(Runtime.PODMAN, name, pid=os.getpid())

    summaries = [{"Id": "a"}, {"Id": "gone"}, {"Id": 7}, "junk", {"Id": "stopped"}, {"Id": "b"}]
    refs = await refs_from_summaries(summaries, inspect, "podman")
    assert [r.name for r in refs] == ["a", "b"]
    with pytest.raises(RuntimeApiError, match="docker: the container list is not a list"):
        await refs_from_summaries({"Id": "a"}, inspect, "docker")


def test_podman_tool_event_names() -> None:
    line = (
        b'{"ID":"9f53","Image":"","Name":"pm1","Status":"start",'
        b'"Time":"2026-11-22T07:57:45.908249008Z","Type":"container","Attributes":{}}'
    )
    assert PodmanAdapter._name_in_tool_event(line) == "pm1"
    assert PodmanAdapter._name_in_tool_event(b'{"Type":"image","Name":"x"}') is None
    assert PodmanAdapter._name_in_tool_event(b"garbage") is None


# -- cgroup targets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_path", "normal"),
    [
        ("/lxc.payload.c1", "/lxc.payload.c1"),
        ("lxc.payload.c1/", "/lxc.payload.c1"),
        ("/sys/fs/cgroup/unified/docker/ab", "/docker/ab"),
        ("/sys/fs/cgroup/devices/docker/ab", "/docker/ab"),
        ("/sys/fs/cgroup/system.slice/x.scope", "/system.slice/x.scope"),
        ("/machine.slice/*", "/machine.slice/*"),
    ],
)
def test_cgroup_target_paths(given_path: str, normal: str) -> None:
    assert _normalize(given_path) == normal


def test_cgroup_target_rejects_dot_dot() -> None:
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        _normalize("/a/../b")


PROC_NET_UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 @/var/lib/lxc/ha/command
0000000000000000: 00000002 00000000 00010000 0001 01 31338 @/var/lib/lxc/web/command
0000000000000000: 00000002 00000000 00010000 0001 01 31339 @/elsewhere/x/command
0000000000000000: 00000003 00000000 00000000 0001 03 12345
"""


def test_lxc_command_sockets_tell_a_fast_restart_by_the_inode() -> None:
    from hotrelay.runtimes.lxc import command_sockets

    before = command_sockets(PROC_NET_UNIX, ["/var/lib/lxc"])
    assert before == {("@/var/lib/lxc/ha/command", "31337"), ("@/var/lib/lxc/web/command", "31338")}
    # lxc-stop -k; lxc-start between two polls: the same name, a new socket.
    restarted = PROC_NET_UNIX.replace(" 31337 ", " 40001 ")
    assert command_sockets(restarted, ["/var/lib/lxc"]) != before
