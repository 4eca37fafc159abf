"""The ``hotrelay`` command line: parses arguments, runs a verb, maps errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hotrelay import __version__
from hotrelay.control_cli import add_control_verbs, add_daemon_monitor_options
from hotrelay.daemon.logging_setup import add_logging_options
from hotrelay.daemon.source import SourceKind
from hotrelay.errors import HotrelayError

Verb = Callable[[argparse.Namespace], int]


def _monitor(args: argparse.Namespace) -> int:
    if args.daemon:
        from hotrelay.control_cli import run_daemon_monitor

        return run_daemon_monitor(args, sys.stdout)
    import trio

    from hotrelay.monitor import MonitorOptions, run_monitor

    options = MonitorOptions(
        kind=SourceKind(args.source),
        json=args.json,
        properties=args.properties,
        subsystems=frozenset(args.subsystem or ()),
        count=args.count,
        timeout=args.timeout,
        rcvbuf=args.rcvbuf,
    )
    return trio.run(run_monitor, options, sys.stdout, sys.stderr)


def _run(args: argparse.Namespace) -> int:
    import trio

    from hotrelay.daemon.main import RunOptions, run_daemon

    options = RunOptions(
        config=args.config,
        rules_dir=args.rules,
        state_dir=args.state_dir,
        socket=args.socket,
        source=args.source,
        revoke_on_exit=args.revoke_on_exit,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    return trio.run(run_daemon, options)


def _demo(args: argparse.Namespace) -> int:
    from hotrelay.demo import run_demo

    return run_demo(sys.stdout)


def _check(args: argparse.Namespace) -> int:
    from hotrelay.rules_cli import run_check

    return run_check(args.paths, sys.stdout, sys.stderr, as_json=args.json)


def _explain(args: argparse.Namespace) -> int:
    from hotrelay.rules_cli import run_explain

    return run_explain(
        args.device,
        args.rules,
        args.sysfs,
        args.json,
        sys.stdout,
        sys.stderr,
        socket=args.socket,
        config=args.config,
    )


def _simulate(args: argparse.Namespace) -> int:
    from hotrelay.rules_cli import run_simulate

    return run_simulate(
        args.uevent_file,
        args.rules,
        args.sysfs,
        args.json,
        sys.stdout,
        sys.stderr,
        socket=args.socket,
        config=args.config,
    )


def _add_rule_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules_dir = Path("/etc/hotrelay/rules.d")
    check = verbs.add_parser(
        "check",
        help="validate rule files (exit 1 with path:line: messages)",
        description="Validate rule files and directories (every *.toml, in name order). "
        "Prints each problem as path:line: message and exits 1, or exits 0.",
    )
    check.add_argument(
        "paths", nargs="*", metavar="PATH", help=f"rule files or directories (default {rules_dir})"
    )
    check.add_argument(
        "--json",
        action="store_true",
        help='one JSON document: {"ok": ..., "rules": N, "files": [...], "errors": '
        '[{"path", "line", "message"}]}',
    )
    check.set_defaults(func=_check)

    explain = verbs.add_parser(
        "explain",
        help="show which rules match a device, or why not",
        description="For a device present on this host, print each rule's verdict: matched, "
        "or the first condition that failed with the value actually seen; and the targets "
        "that would receive the device.",
    )
    explain.add_argument("device", metavar="DEVICE", help="/dev/NODE or /sys/... device path")

    simulate = verbs.add_parser(
        "simulate",
        help="print the actions a captured uevent would cause (changes nothing)",
        description="Replay a captured uevent (kernel or libudev wire bytes, or KEY=VALUE "
        "lines as udevadm info prints them) through the rules and print the plan.",
    )
    simulate.add_argument("uevent_file", type=Path, metavar="UEVENT_FILE")
    for parser in (explain, simulate):
        parser.add_argument(
            "--rules",
            type=Path,
            default=rules_dir,
            metavar="DIR",
            help=f"rules directory (default {rules_dir})",
        )
        parser.add_argument(
            "--sysfs",
            type=Path,
            default=Path("/sys"),
            metavar="DIR",
            help="read devices from this sysfs tree (default /sys)",
        )
        parser.add_argument("--json", action="store_true", help="one JSON document")
        parser.add_argument(
            "--socket",
            type=Path,
            metavar="PATH",
            help="ask this daemon which containers run (default: the config's socket)",
        )
        parser.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="the config whose runtimes to ask when no daemon runs "
            "(default /etc/hotrelay/hotrelay.toml)",
        )
    explain.set_defaults(func=_explain)
    simulate.set_defaults(func=_simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotrelay",
        description="Relay host hotplug events into running containers.",
    )
    parser.add_argument("--version", action="version", version=f"hotrelay {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    monitor = verbs.add_parser(
        "monitor",
        help="print trusted uevents as they arrive (like udevadm monitor)",
        description="Print every trusted uevent as it arrives. Messages from untrusted "
        "senders are dropped and counted; a receive-buffer overflow is reported.",
    )
    monitor.add_argument(
        "--source",
        choices=[k.value for k in SourceKind],
        default="auto",
        help="kernel (netlink group 1), udev (group 2, needs udevd) or auto (default)",
    )
    monitor.add_argument("--json", action="store_true", help="one JSON object per line")
    monitor.add_argument(
        "-p", "--properties", action="store_true", help="print every property of each event"
    )
    monitor.add_argument(
        "-s", "--subsystem", action="append", metavar="NAME", help="only this subsystem (repeat)"
    )
    monitor.add_argument("--count", type=int, metavar="N", help="exit after N events")
    monitor.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after SECONDS")
    monitor.add_argument(
        "--rcvbuf",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="socket receive buffer (default 64 MiB)",
    )
    add_daemon_monitor_options(monitor)
    monitor.set_defaults(func=_monitor)

    run = verbs.add_parser(
        "run",
        help="the relay daemon, in the foreground (root)",
        description="Relay hotplug events into running containers until SIGTERM. "
        "SIGHUP (or `hotrelay reload`) re-reads the rules.",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/hotrelay/hotrelay.toml"),
        metavar="FILE",
        help="config file (default /etc/hotrelay/hotrelay.toml; absent = defaults)",
    )
    run.add_argument("--rules", type=Path, metavar="DIR", help="rules directory")
    run.add_argument("--state-dir", type=Path, metavar="DIR", help="state directory")
    run.add_argument("--socket", type=Path, metavar="PATH", help="control socket")
    run.add_argument("--source", choices=[k.value for k in SourceKind], help="event source")
    run.add_argument(
        "--revoke-on-exit",
        action="store_true",
        default=None,
        help="on a clean stop, revoke every grant (default: leave them in place)",
    )
    add_logging_options(run)
    run.set_defaults(func=_run)

    demo = verbs.add_parser(
        "demo",
        help="the whole flow on a throwaway container: hotplug a disk and a NIC into it (root)",
    )
    demo.set_defaults(func=_demo)
    _add_rule_verbs(verbs)
    add_control_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Verb = args.func
    try:
        return func(args)
    except HotrelayError as exc:
        print(f"hotrelay: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors in groups; an operator error is still just that.
        matched, rest = group.split(HotrelayError)
        if matched is None or rest is not None:
            raise
        errors = _leaves(matched)
        for error in errors:
            print(f"hotrelay: {error}", file=sys.stderr)
        return max(error.exit_code for error in errors)
    except KeyboardInterrupt:
        return 130


def _leaves(group: BaseExceptionGroup[HotrelayError]) -> list[HotrelayError]:
    leaves: list[HotrelayError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves += _leaves(exc)
        else:
            leaves.append(exc)
    return leaves


if __name__ == "__main__":
    sys.exit(main())
