"""The daemon's config file: every key, every error class with its exact ``path:line:`` text."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotrelay.core.config import (
    Config,
    ConfigError,
    MetricsAddress,
    RuntimesConfig,
    load_config_text,
)
from hotrelay.core.containers import Runtime
from hotrelay.core.rules import RuleError, RuleSetError
from hotrelay.daemon.source import DEFAULT_RCVBUF

PATH = "/etc/hotrelay/hotrelay.toml"

EVERY_KEY = """\
# Every setting, none at its default.
rules_dir = "/srv/hotrelay/rules"
state_dir = "/var/lib/hotrelay"
socket = "/run/hr/control.sock"
socket_group = "hotrelay"
source = "kernel"
rcvbuf = "128M"
heal_interval = 2.5
revoke_on_exit = true
log_level = "debug"
log_format = "journal"
metrics = "127.0.0.1:9477"

[runtimes]
enabled = ["lxc", "docker", "runc"]

[runtimes.lxc]
paths = ["/var/lib/lxc", "/home/u/.local/share/lxc"]

[runtimes.docker]
socket = "/var/run/docker.sock"

[runtimes.podman]
socket = "/run/user/1000/podman/podman.sock"

[runtimes.lxd]
socket = "/var/lib/lxd/unix.socket"

[runtimes.incus]
socket = "/run/incus/unix.socket"

[runtimes.runc]
roots = ["/run/runc", "/run/containerd/runc/k8s.io"]

[runtimes.nspawn]
machines_dir = "/run/machines"
"""


def test_every_key() -> None:
    assert load_config_text(EVERY_KEY, PATH) == Config(
        rules_dir="/srv/hotrelay/rules",
        state_dir="/var/lib/hotrelay",
        socket="/run/hr/control.sock",
        socket_group="hotrelay",
        source="kernel",
        rcvbuf=128 * 1024 * 1024,
        heal_interval=2.5,
        revoke_on_exit=True,
        log_level="debug",
        log_format="journal",
        metrics=MetricsAddress("127.0.0.1", 9477),
        runtimes=RuntimesConfig(
            enabled=(Runtime.LXC, Runtime.DOCKER, Runtime.RUNC),
            lxc_paths=("/var/lib/lxc", "/home/u/.local/share/lxc"),
            docker_socket="/var/run/docker.sock",
            podman_socket="/run/user/1000/podman/podman.sock",
            lxd_socket="/var/lib/lxd/unix.socket",
            incus_socket="/run/incus/unix.socket",
            runc_roots=("/run/runc", "/run/containerd/runc/k8s.io"),
            nspawn_machines_dir="/run/machines",
        ),
    )


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "[runtimes]\n"])
def test_empty_file_is_all_defaults(text: str) -> None:
    config = load_config_text(text, PATH)
    assert config == Config()
    assert config.rules_dir == "/etc/hotrelay/rules.d"
    assert config.state_dir == "/run/hotrelay"
    assert config.socket == "/run/hotrelay/control.sock"
    assert config.socket_group is None
    assert config.source == "auto"
    assert config.heal_interval == 5
    assert config.revoke_on_exit is False
    assert config.log_level == "info"
    assert config.log_format == "auto"
    assert config.metrics is None
    assert Runtime.PID not in config.runtimes.enabled
    assert set(config.runtimes.enabled) == set(Runtime) - {Runtime.PID, Runtime.CGROUP}


def test_rcvbuf_default_matches_the_event_source() -> None:
    assert Config().rcvbuf == DEFAULT_RCVBUF


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.socket = "/tmp/x"  # type: ignore[misc]


def test_dotted_keys_and_inline_tables() -> None:
    config = load_config_text(
        'runtimes.enabled = "podman"\nruntimes.podman = { socket = "/p.sock" }\n', PATH
    )
    assert config.runtimes.enabled == (Runtime.PODMAN,)
    assert config.runtimes.podman_socket == "/p.sock"
    assert config.runtimes.docker_socket == RuntimesConfig().docker_socket


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('rcvbuf = "64K"', 65536),
        ('rcvbuf = "1G"', 1024**3),
        ('rcvbuf = "2MiB"', 2 * 1024**2),
        ('rcvbuf = "8m"', 8 * 1024**2),
        ("rcvbuf = 1048576", 1048576),
    ],
)
def test_sizes(line: str, expected: int) -> None:
    assert load_config_text(line, PATH).rcvbuf == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("heal_interval = 0", 0.0),
        ("heal_interval = 0.1", 0.1),
        ("heal_interval = 86400", 86400.0),
        ("heal_interval = 30", 30.0),
    ],
)
def test_heal_intervals(line: str, expected: float) -> None:
    assert load_config_text(line, PATH).heal_interval == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('socket_group = "hotrelay"', "hotrelay"),
        ('socket_group = "adm"', "adm"),
        ("socket_group = 998", 998),
        ('socket_group = "998"', 998),
    ],
)
def test_socket_groups(line: str, expected: str | int) -> None:
    assert load_config_text(line, PATH).socket_group == expected


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("127.0.0.1:9477", "127.0.0.1", 9477),
        ("[::1]:9477", "::1", 9477),
        ("localhost:0", "localhost", 0),
        ("metrics.example.org:65535", "metrics.example.org", 65535),
        ("0.0.0.0:9477", "0.0.0.0", 9477),
    ],
)
def test_metrics_addresses(value: str, host: str, port: int) -> None:
    address = load_config_text(f'metrics = "{value}"', PATH).metrics
    assert address == MetricsAddress(host, port)
    assert str(address) == value


def test_empty_runtime_list_watches_nothing() -> None:
    assert load_config_text("runtimes.enabled = []", PATH).runtimes.enabled == ()


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, PATH)
    assert isinstance(caught.value, RuleSetError)
    assert all(isinstance(e, RuleError) for e in caught.value.errors)
    assert str(caught.value) == "\n".join(str(e) for e in caught.value.errors)
    return [str(e) for e in caught.value.errors]


P = PATH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TOML syntax, as the rule files report it.
        (
            'socket = "/x"\nsocket = "/y"\n',
            f"{P}:2: invalid TOML: Cannot overwrite a value (column 14)",
        ),
        ('source = "udev', f"{P}:1: invalid TOML: Unterminated string (at end of file)"),
        # Unknown keys, with a suggestion when one is close.
        (
            'rule_dir = "/x"',
            f'{P}:1: unknown key "rule_dir" (did you mean "rules_dir"?); expected one of '
            "heal_interval, log_format, log_level, metrics, rcvbuf, revoke_on_exit, rules_dir, "
            "runtimes, socket, socket_group, source, state_dir, udev_control",
        ),
        (
            "\n[[rule]]\nname = 1",
            f'{P}:2: unknown key "rule" (rules go in files under rules_dir, not in the '
            "daemon's config); expected one of "
            "heal_interval, log_format, log_level, metrics, rcvbuf, revoke_on_exit, rules_dir, "
            "runtimes, socket, socket_group, source, state_dir, udev_control",
        ),
        (
            "[runtimes]\nenable = []",
            f'{P}:2: runtimes: unknown key "enable" (did you mean "enabled"?); expected one of '
            "docker, enabled, incus, lxc, lxd, nspawn, podman, runc",
        ),
        (
            "[runtimes.docker]\n\nsock = '/d'",
            f'{P}:3: runtimes.docker: unknown key "sock" (did you mean "socket"?); '
            "expected one of socket",
        ),
        (
            "[runtimes.lxc]\npath = []",
            f'{P}:2: runtimes.lxc: unknown key "path" (did you mean "paths"?); '
            "expected one of paths",
        ),
        # Paths.
        (
            "rules_dir = 1",
            f'{P}:1: rules_dir: expected an absolute path such as "/run/x", got integer 1',
        ),
        ('state_dir = "run/hotrelay"', f'{P}:1: state_dir: "run/hotrelay" is not an absolute path'),
        ('rules_dir = "/a\\u0000b"', f'{P}:1: rules_dir: "/a\\u0000b" contains a NUL character'),
        (
            'socket = "/run/hotrelay/"',
            f'{P}:1: socket: "/run/hotrelay/" names a directory, not a socket file',
        ),
        (
            f'socket = "/{"s" * 107}"',
            f"{P}:1: socket: path is 108 bytes long; a unix socket path is at most 107 bytes",
        ),
        (
            "runtimes.lxc.paths = [1]",
            f'{P}:1: runtimes.lxc.paths: expected an absolute path such as "/run/x", got integer 1',
        ),
        (
            "runtimes.runc.roots = {}",
            f"{P}:1: runtimes.runc.roots: expected an array of absolute paths such as "
            '["/var/lib/lxc"], got a table',
        ),
        (
            'runtimes.nspawn.machines_dir = "machines"',
            f'{P}:1: runtimes.nspawn.machines_dir: "machines" is not an absolute path',
        ),
        (
            "runtimes.podman.socket = true",
            f'{P}:1: runtimes.podman.socket: expected an absolute path such as "/run/x", '
            "got boolean true",
        ),
        # socket_group.
        (
            'socket_group = "bad name"',
            f'{P}:1: socket_group: "bad name" is not a group name or number',
        ),
        ("socket_group = -1", f"{P}:1: socket_group: -1 is not a valid group id (0 to 4294967294)"),
        (
            "socket_group = 4294967295",
            f"{P}:1: socket_group: 4294967295 is not a valid group id (0 to 4294967294)",
        ),
        (
            "socket_group = []",
            f'{P}:1: socket_group: expected a group name such as "hotrelay", got an array',
        ),
        # Choices.
        (
            'source = "netlink"',
            f'{P}:1: source: expected one of auto, kernel, udev, got "netlink"',
        ),
        (
            'source = "Kernel"',
            f'{P}:1: source: expected one of auto, kernel, udev, got "Kernel" '
            '(did you mean "kernel"?)',
        ),
        ("source = 1", f"{P}:1: source: expected one of auto, kernel, udev, got integer 1"),
        (
            'log_level = "warn"',
            f"{P}:1: log_level: expected one of debug, info, warning, error, "
            'got "warn" (did you mean "warning"?)',
        ),
        (
            'log_format = "json"',
            f'{P}:1: log_format: expected one of auto, text, journal, got "json"',
        ),
        # rcvbuf.
        ('rcvbuf = "64Q"', f'{P}:1: rcvbuf: "64Q" is not a size such as "64M"'),
        (
            "rcvbuf = 1.5",
            f'{P}:1: rcvbuf: expected a size in bytes such as 67108864 or "64M", got float 1.5',
        ),
        (
            "rcvbuf = 1024",
            f"{P}:1: rcvbuf: 1024 bytes is out of range; expected 65536 (64K) to 1073741824 (1G)",
        ),
        (
            'rcvbuf = "2G"',
            f"{P}:1: rcvbuf: 2147483648 bytes is out of range; expected 65536 "
            "(64K) to 1073741824 (1G)",
        ),
        # heal_interval.
        (
            'heal_interval = "5s"',
            f"{P}:1: heal_interval: expected a number of seconds such as 5 "
            '(0 turns self-healing off), got string "5s"',
        ),
        (
            "heal_interval = true",
            f"{P}:1: heal_interval: expected a number of seconds such as 5 "
            "(0 turns self-healing off), got boolean true",
        ),
        (
            "heal_interval = -1",
            f"{P}:1: heal_interval: -1 is out of range; expected 0 (off) or 0.1 to 86400 seconds",
        ),
        (
            "heal_interval = 0.01",
            f"{P}:1: heal_interval: 0.01 is out of range; expected 0 (off) or 0.1 to 86400 seconds",
        ),
        ("heal_interval = nan", f"{P}:1: heal_interval: nan is not a number of seconds"),
        ("heal_interval = inf", f"{P}:1: heal_interval: inf is not a number of seconds"),
        # revoke_on_exit.
        (
            'revoke_on_exit = "yes"',
            f'{P}:1: revoke_on_exit: expected true or false, got string "yes"',
        ),
        ("revoke_on_exit = 1", f"{P}:1: revoke_on_exit: expected true or false, got integer 1"),
        # metrics.
        (
            "metrics = 9477",
            f'{P}:1: metrics: expected an address such as "127.0.0.1:9477", got integer 9477',
        ),
        (
            'metrics = "9477"',
            f'{P}:1: metrics: "9477" is not HOST:PORT such as "127.0.0.1:9477"',
        ),
        (
            'metrics = ":9477"',
            f'{P}:1: metrics: ":9477" has no host; name the address to listen on, such as '
            '"127.0.0.1:9477" (metrics are never served on every interface by default)',
        ),
        (
            'metrics = "::1:9477"',
            f'{P}:1: metrics: "::1:9477": write an IPv6 address in brackets, such as "[::1]:9477"',
        ),
        ('metrics = "[::g]:1"', f'{P}:1: metrics: "::g" is not an IPv6 address'),
        (
            'metrics = "bad_host:1"',
            f'{P}:1: metrics: "bad_host" is not an IP address or host name',
        ),
        (
            'metrics = "127.0.0.1:http"',
            f'{P}:1: metrics: port "http" is not a number from 0 to 65535',
        ),
        (
            'metrics = "127.0.0.1:65536"',
            f'{P}:1: metrics: port "65536" is not a number from 0 to 65535',
        ),
        # runtimes.
        (
            'runtimes = "lxc"',
            f'{P}:1: runtimes: expected a table such as [runtimes], got string "lxc"',
        ),
        (
            'runtimes.docker = "/d.sock"',
            f"{P}:1: runtimes.docker: expected a table such as "
            '[runtimes.docker], got string "/d.sock"',
        ),
        (
            'runtimes.enabled = ["lxc", "k8s"]',
            f'{P}:1: runtimes.enabled: "k8s" is not a runtime; expected some of docker, incus, '
            "lxc, lxd, nspawn, podman, runc",
        ),
        (
            'runtimes.enabled = ["dockr"]',
            f'{P}:1: runtimes.enabled: "dockr" is not a runtime (did you mean "docker"?); '
            "expected some of docker, incus, lxc, lxd, nspawn, podman, runc",
        ),
        (
            'runtimes.enabled = ["pid"]',
            f'{P}:1: runtimes.enabled: "pid" is not a runtime; expected some of docker, incus, '
            "lxc, lxd, nspawn, podman, runc",
        ),
        ('runtimes.enabled = ["lxc", "lxc"]', f'{P}:1: runtimes.enabled: "lxc" is listed twice'),
        (
            "runtimes.enabled = [1]",
            f"{P}:1: runtimes.enabled: expected runtime names in the array, got integer 1",
        ),
        (
            "runtimes.enabled = 1",
            f"{P}:1: runtimes.enabled: expected an array of runtime names "
            'such as ["lxc", "docker"], got integer 1',
        ),
    ],
)
def test_error(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_every_problem_is_reported_in_line_order() -> None:
    text = """\
[runtimes.docker]
socket = "docker.sock"

[runtimes]
enabled = ["k8s"]
"""
    text = 'source = "x"\nheal_interval = -2\n' + text + "bogus = 1\n"
    assert [e.split(": ", 1)[0] for e in errors(text)] == [
        f"{P}:1",
        f"{P}:2",
        f"{P}:4",
        f"{P}:7",
        f"{P}:8",
    ]


def test_line_of_a_key_inside_an_inline_table_is_the_table_line() -> None:
    assert errors('\n\nruntimes = { lxc = { paths = ["x"] } }\n') == [
        f'{P}:3: runtimes.lxc.paths: "x" is not an absolute path'
    ]


def test_a_key_after_a_table_header_belongs_to_that_table() -> None:
    # The classic TOML slip: `source` written after [runtimes] is runtimes.source.
    assert errors('[runtimes]\nsource = "udev"\n') == [
        f'{P}:2: runtimes: unknown key "source"; expected one of '
        "docker, enabled, incus, lxc, lxd, nspawn, podman, runc"
    ]


# Only ConfigError comes out of the loader, whatever the text.

_KEYS = st.sampled_from(
    [
        "rules_dir",
        "state_dir",
        "socket",
        "socket_group",
        "source",
        "rcvbuf",
        "heal_interval",
        "revoke_on_exit",
        "log_level",
        "log_format",
        "metrics",
        "runtimes",
        "enabled",
        "lxc",
        "docker",
        "paths",
        "roots",
        "machines_dir",
        "x",
    ]
)
_SCALARS = st.one_of(
    st.sampled_from(['"/run/x"', '"auto"', '"64M"', '"127.0.0.1:1"', '"[::1]:2"', '"lxc"']),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True).map(repr),  # TOML spells nan, inf and -inf the same
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=12).map(json.dumps),  # mostly valid TOML; the rest must fail cleanly
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(_KEYS, inner), max_size=3).map(
            lambda kvs: "{ " + ", ".join(f"{k} = {v}" for k, v in dict(kvs).items()) + " }"
        ),
    ),
    max_leaves=6,
)
_LINES = st.one_of(
    st.tuples(_KEYS, _VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(["[runtimes]", "[runtimes.lxc]", "[runtimes.docker]", "[x]", "[[rule]]"]),
    st.text(max_size=20),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINES, max_size=8).map("\n".join))
def test_fuzz_only_config_errors_come_out(text: str) -> None:
    problems: tuple[RuleError, ...] = ()
    try:
        config = load_config_text(text, PATH)
    except ConfigError as exc:
        problems = exc.errors
        assert problems
    else:
        assert isinstance(config, Config)
    for error in problems:
        assert isinstance(error, RuleError)
        assert error.path == PATH
        assert error.line is not None
        assert 1 <= error.line <= text.count("\n") + 1


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load_config_text(text, PATH)
