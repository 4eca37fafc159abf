"""``hotrelay run``: builds the daemon from its config and runs it until SIGTERM.

The wiring lives here and nowhere else: config -> logging -> effectors (cgroups, nodes,
uevents, netdevs, sharing one pool of namespace helpers) -> runtime adapters -> the
Daemon pump -> the control socket, sd_notify and metrics around it.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from hotrelay.control.server import (
    ControlSettings,
    activation_socket,
    prepare_socket_directory,
    serve_control,
)
from hotrelay.core.config import Config, RuntimesConfig, load_config_text
from hotrelay.core.containers import Runtime
from hotrelay.core.relay import BindingKey
from hotrelay.core.rules import RuleSet
from hotrelay.daemon.control_handler import DaemonControl, attached_rules_path
from hotrelay.daemon.effectors import (
    CgroupEffector,
    InjectEffector,
    NetdevEffector,
    NodeEffector,
    NoteEffector,
    SymlinkEffector,
)
from hotrelay.daemon.executor import Effector, Executor, key_from_record
from hotrelay.daemon.ledger import Ledger
from hotrelay.daemon.logging_setup import setup_logging
from hotrelay.daemon.metrics import DaemonMetrics, serve_metrics
from hotrelay.daemon.pump import Daemon, DaemonOptions
from hotrelay.daemon.sdnotify import Notifier, feed_watchdog, watchdog_interval
from hotrelay.daemon.source import SourceKind
from hotrelay.daemon.statelock import lock_state_directory
from hotrelay.effectors.cgroups import DeviceGrants
from hotrelay.effectors.devnode import DeviceNodes
from hotrelay.effectors.netdev import NetdevMover
from hotrelay.effectors.nshelper import NamespaceHelpers
from hotrelay.effectors.uevent_inject import UeventInjector
from hotrelay.errors import HotrelayError, NotRootError
from hotrelay.rules_files import load_rules
from hotrelay.runtimes import (
    Adapter,
    CgroupAdapter,
    DockerAdapter,
    IncusAdapter,
    LxcAdapter,
    LxdAdapter,
    NspawnAdapter,
    OciAdapter,
    PidAdapter,
    PodmanAdapter,
)

__all__ = ["RunOptions", "build_adapters", "load_config", "run_daemon"]

log = logging.getLogger("hotrelay")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the command line may override in the config file."""

    config: Path = Path("/etc/hotrelay/hotrelay.toml")
    rules_dir: Path | None = None
    state_dir: Path | None = None
    socket: Path | None = None
    source: str | None = None
    revoke_on_exit: bool | None = None
    log_level: str | None = None
    log_format: str | None = None


def load_config(path: Path) -> Config:
    """The config file (all defaults when it does not exist); errors name path:line:key."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HotrelayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_config_text(text, str(path))


def build_adapters(config: RuntimesConfig) -> list[Adapter]:
    """One adapter per enabled runtime, looking where the config says. pid: and cgroup:
    targets are always watched: the rules say which ones."""
    factories: dict[Runtime, Callable[[], Adapter]] = {
        Runtime.LXC: lambda: LxcAdapter(config.lxc_paths),
        Runtime.LXD: lambda: LxdAdapter([config.lxd_socket]),
        Runtime.INCUS: lambda: IncusAdapter([config.incus_socket]),
        Runtime.DOCKER: lambda: DockerAdapter(config.docker_socket),
        Runtime.PODMAN: lambda: PodmanAdapter(config.podman_socket, runc_roots=config.runc_roots),
        Runtime.RUNC: lambda: OciAdapter(config.runc_roots),
        Runtime.NSPAWN: lambda: NspawnAdapter(config.nspawn_machines_dir),
    }
    adapters: list[Adapter] = [factories[r]() for r in config.enabled if r in factories]
    return [*adapters, PidAdapter(), CgroupAdapter()]


def _rules_loader(rules_dir: Path, state_dir: Path) -> RuleSet:
    """The rule files plus the manual attaches kept in the state dir."""
    attached = attached_rules_path(state_dir)
    paths = [rules_dir, attached] if attached.exists() else [rules_dir]
    return load_rules(paths)


# What a reload can change while running; other keys are read once, at start.
LIVE_KEYS = frozenset({"rules_dir", "log_level", "log_format"})


class _Settings:
    """The config and rules, re-read together on every reload (SIGHUP, ``reload``).

    All or nothing: an error in either keeps both as they were. Logging and the rules
    directory change at once; other changed keys are reported as needing a restart.
    """

    def __init__(self, options: RunOptions, config: Config, state_dir: Path) -> None:
        self.options = options
        self.config = config
        self.state_dir = state_dir

    def _rules_dir(self, config: Config) -> Path:
        return self.options.rules_dir or Path(config.rules_dir)

    def load(self) -> RuleSet:
        """At start: the rules, with the config already read."""
        return _rules_loader(self._rules_dir(self.config), self.state_dir)

    def reload(self) -> RuleSet:
        config = load_config(self.options.config)
        rules = _rules_loader(self._rules_dir(config), self.state_dir)
        old = self.config
        later = [
            name
            for name in Config.__dataclass_fields__
            if name not in LIVE_KEYS and getattr(config, name) != getattr(old, name)
        ]
        if later:
            log.warning("config: %s changed; takes effect after a restart", ", ".join(later))
        setup_logging(
            self.options.log_level or config.log_level,
            self.options.log_format or config.log_format,
        )
        self.config = config
        return rules


async def _heal(
    cgroups: CgroupEffector,
    in_container: Mapping[str, NodeEffector | SymlinkEffector],
    ledger: Ledger,
    healable: Callable[[BindingKey], bool],
    executor: Executor,
    count: Callable[[int], None],
) -> int:
    """The self-healing pass, for settled bindings: device-cgroup grants a runtime took
    away (a systemd-managed policy on ``systemctl daemon-reload``), here and now; nodes
    and links that are gone, by a task in each container's queue (a check per node or
    link: the pump, which runs this pass, must not wait for thousands of them)."""
    await trio.lowlevel.checkpoint()
    entries = []
    # A v2 heal makes each program hold exactly the grants it is given: a container
    # with any binding being applied or undone (its grant may be in the program, or on
    # its way out) waits for the next pass, or its in-flight grants would be stripped.
    busy: set[tuple[str, str]] = set()
    for entry in ledger.entries():
        record = entry.record
        if entry.kind != "binding":
            continue
        try:
            key = key_from_record(record["key"])
        except (KeyError, ValueError, TypeError):
            continue
        if record.get("complete") and healable(key):
            entries.append((key, entry))
        else:
            busy.add((key.runtime.value, key.container))
    grants = [
        (entry.key, index, step)
        for key, entry in entries
        if (key.runtime.value, key.container) not in busy
        for index, step in enumerate(entry.record.get("steps", []))
        if step.get("kind") == "GrantDevice" and "grant" in step.get("record", {})
    ]
    heals = 0
    if grants:
        # No await from the ledger read to the write below: no job's write comes between.
        records, healed, errors = cgroups.reconcile([step["record"] for _, _, step in grants])
        for error in errors:
            log.error("heal: %s", error)
        heals += healed
        if healed:
            executor.record_heals(
                [
                    (key, index, "GrantDevice", record)
                    for (key, index, _), record in zip(grants, records, strict=True)
                ]
            )
    with_nodes: dict[tuple[Runtime, str], list[str]] = {}
    for key, entry in entries:
        if any(step.get("kind") in in_container for step in entry.record.get("steps", [])):
            with_nodes.setdefault((key.runtime, key.container), []).append(entry.key)
    for container, keys in with_nodes.items():
        executor.submit_task(
            container, partial(_heal_nodes, in_container, ledger, executor, keys, count)
        )
    return heals


async def _heal_nodes(
    in_container: Mapping[str, NodeEffector | SymlinkEffector],
    ledger: Ledger,
    executor: Executor,
    keys: list[str],
    count: Callable[[int], None],
) -> None:
    """Make again the nodes and links of one container's bindings that are gone. Runs
    in the container's queue, so no job of that container runs meanwhile; each entry is
    read when its turn comes (a job queued before this task may have changed or removed
    it)."""
    for key in keys:
        entry = ledger.get(key)
        if entry is None or not entry.record.get("complete"):
            continue
        for index, step in enumerate(entry.record.get("steps", [])):
            kind = step.get("kind")
            healer = in_container.get(kind) if isinstance(kind, str) else None
            if healer is None:
                continue
            try:
                remade = await healer.heal(step.get("record", {}))
            except (HotrelayError, OSError) as exc:
                log.error("heal: %s: %s", key, exc)
                continue
            if remade is None:
                continue
            # Kept by the executor, which reads the entry again: the pass in the pump
            # may have updated the grant's record of it while we waited for the helper.
            executor.record_heals([(key, index, str(kind), remade)])
            count(1)


async def run_daemon(options: RunOptions) -> int:
    if os.geteuid() != 0:
        raise NotRootError("run: the daemon needs root (netlink, cgroups, namespaces)")
    config = load_config(options.config)
    setup_logging(options.log_level or config.log_level, options.log_format or config.log_format)
    state_dir = options.state_dir or Path(config.state_dir)
    rules_dir = options.rules_dir or Path(config.rules_dir)
    daemon_options = DaemonOptions(
        rules_dir=rules_dir,
        state_dir=state_dir,
        source=SourceKind(options.source or config.source),
        udev_control=Path(config.udev_control),
        rcvbuf=config.rcvbuf,
        heal_interval=config.heal_interval,
        revoke_on_exit=(
            config.revoke_on_exit if options.revoke_on_exit is None else options.revoke_on_exit
        ),
    )
    settings = ControlSettings.from_config(config)
    if options.socket is not None:
        settings = ControlSettings(options.socket, settings.group)
    if settings.path.parent == state_dir:
        # The default layout (/run/hotrelay/control.sock): the state directory is also
        # the socket's, so socket_group members must be able to search it (0710).
        prepare_socket_directory(state_dir, settings.group, own=True)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Before anything reads or writes the state: one daemon per state directory. The
    # descriptor stays open (and locked) until this process ends.
    lock_state_directory(state_dir)

    notifier = Notifier.from_environment()
    metrics = DaemonMetrics()
    helpers = NamespaceHelpers()
    grants = DeviceGrants()
    nodes = DeviceNodes(helpers, nodes_dir=state_dir / "nodes")
    cgroups = CgroupEffector(grants)
    node_effector = NodeEffector(nodes, helpers)
    symlink_effector = SymlinkEffector(nodes, helpers)
    effectors: dict[str, Effector] = {
        "GrantDevice": cgroups,
        "MakeNode": node_effector,
        "MakeSymlink": symlink_effector,
        "InjectUevent": InjectEffector(UeventInjector(helpers)),
        "MoveNetdev": NetdevEffector(NetdevMover(helpers)),
        "SkipSymlink": NoteEffector(),
    }
    settings_source = _Settings(options, config, state_dir)
    daemon = Daemon(
        daemon_options,
        effectors=effectors,
        runtimes=build_adapters(config.runtimes),
        load_rules=settings_source.load,
        reload_rules=settings_source.reload,
        heal=partial(_heal, cgroups, {"MakeNode": node_effector, "MakeSymlink": symlink_effector}),
        metrics=metrics,
        notifier=notifier,
    )
    try:
        async with trio.open_nursery() as nursery:
            # The fork server now, not on the first plug: that plug pays a fork only.
            await helpers.start()
            nursery.start_soon(helpers.reap_forever)
            await nursery.start(daemon.run)
            handler = DaemonControl(daemon, nursery)
            await nursery.start(
                partial(serve_control, handler, settings, listener=activation_socket())
            )
            if config.metrics is not None:
                await nursery.start(
                    serve_metrics, metrics.registry, config.metrics.host, config.metrics.port
                )
            interval = watchdog_interval()
            if interval:
                await nursery.start(feed_watchdog, notifier, interval)
            notifier.ready(f"relaying with {len(daemon.relay.rules)} rules")
            log.info("hotrelay: ready; control socket %s", settings.path)
            await _wait_for_stop_signal()
            notifier.stopping()
            log.info("hotrelay: stopping")
            # revoke_on_exit is a plan like any other: run while the executor still runs.
            await daemon.stop()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await helpers.aclose()
        grants.close()
    return 0


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return
