"""The shared core data: id maps, device-cgroup rules and container references."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotrelay.core.containers import ContainerRef, IdMap, IdRange, Runtime
from hotrelay.core.device_access import Access, DeviceRule, DeviceType, parse_devices_list


def test_id_map_parses_proc_format_and_maps_both_ways() -> None:
    m = IdMap.parse("         0     100000      65536\n     65536    1000000         10\n")
    assert m.ranges == (IdRange(0, 100000, 65536), IdRange(65536, 1000000, 10))
    assert m.to_host(0) == 100000
    assert m.to_host(20) == 100020
    assert m.to_host(65537) == 1000001
    assert m.to_host(65546) is None
    assert m.from_host(100020) == 20
    assert m.from_host(0) is None
    assert not m.is_identity
    assert IdMap.parse(m.render()) == m


def test_identity_and_empty_maps_mean_host_ids() -> None:
    identity = IdMap.parse("0 0 4294967295\n")
    assert identity.is_identity
    assert IdMap().is_identity
    assert IdMap().to_host(1234) == 1234
    assert identity.from_host(1234) == 1234


@pytest.mark.parametrize("text", ["0 100000\n", "0 x 1\n", "-1 0 1\n", "0 0 0\n"])
def test_bad_id_map_lines_are_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - both messages are ours
        IdMap.parse(text)


@given(st.integers(0, 2**20), st.integers(0, 2**31), st.integers(1, 2**20), st.integers(0, 2**21))
def test_id_map_round_trips(inside: int, outside: int, count: int, probe: int) -> None:
    m = IdMap((IdRange(inside, outside, count),))
    host = m.to_host(probe)
    assert (host is not None) == (inside <= probe < inside + count)
    if host is not None:
        assert m.from_host(host) == probe


def test_device_rule_parse_render_and_match() -> None:
    rule = DeviceRule.parse("c 1:3 rwm")
    assert rule == DeviceRule(DeviceType.CHAR, 1, 3, Access(True, True, True))
    assert rule.render() == "c 1:3 rwm"
    assert rule.matches(DeviceType.CHAR, 1, 3)
    assert not rule.matches(DeviceType.BLOCK, 1, 3)
    wildcard = DeviceRule.parse("b *:* m")
    assert wildcard.render() == "b *:* m"
    assert wildcard.matches(DeviceType.BLOCK, 253, 7)
    assert DeviceRule.parse("a").render() == "a *:* rwm"
    assert DeviceRule.parse("c 136:* rw").matches(DeviceType.CHAR, 136, 9)


@pytest.mark.parametrize(
    "line", ["x 1:3 rwm", "c 1 rwm", "c 1:3", "c 1:3 rwx", "c a:3 r", "c 1:3 rr", "c 1:3 "]
)
def test_bad_device_rules_are_refused(line: str) -> None:
    with pytest.raises(ValueError, match=r"device rule|access"):
        DeviceRule.parse(line)


def test_access_subsets() -> None:
    assert str(Access.parse("mr")) == "rm"
    assert Access.parse("rwm").covers(Access.parse("rw"))
    assert not Access.parse("r").covers(Access.parse("rw"))
    assert Access.parse("r") | Access.parse("w") == Access(True, True, False)


def test_devices_list_and_oci_rules() -> None:
    rules = parse_devices_list("c 1:3 rwm\nb *:* m\n")
    assert [r.render() for r in rules] == ["c 1:3 rwm", "b *:* m"]
    oci = DeviceRule.from_oci({"allow": False, "access": "rwm"})
    assert oci == DeviceRule(DeviceType.ALL, None, None, Access(), allow=False)
    pts = DeviceRule.from_oci(
        {"allow": True, "type": "c", "major": 136, "minor": -1, "access": "rwm"}
    )
    assert pts.render() == "c 136:* rwm"
    with pytest.raises(ValueError, match="OCI"):
        DeviceRule.from_oci({"type": "c", "major": "1"})


def test_container_ref_is_frozen_data() -> None:
    ref = ContainerRef(
        Runtime.LXC, "ha", pid=42, namespaces={"net": 1}, uid_map=IdMap.parse("0 100000 65536")
    )
    assert ref.target == "lxc:ha"
    assert ref.user_namespaced
    assert ref.key == (Runtime.LXC, "ha")
    with pytest.raises(TypeError):
        ref.namespaces["net"] = 2  # type: ignore[index]
    with pytest.raises(ValueError, match="invalid pid"):
        ContainerRef(Runtime.PID, "0", pid=0)
