"""The ``hotrelay`` command line: parses arguments, runs a verb, maps errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hotrelay import __version__
from hotrelay.daemon.source import SourceKind
from hotrelay.errors import HotrelayError

Verb = Callable[[argparse.Namespace], int]


def _monitor(args: argparse.Namespace) -> int:
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


def _demo(args: argparse.Namespace) -> int:
    import trio

    from hotrelay.demo import run_demo

    return trio.run(run_demo, sys.stdout)


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
    monitor.set_defaults(func=_monitor)

    demo = verbs.add_parser(
        "demo",
        help="hotplug a zram device and a veth pair and show what hotrelay hears (root)",
    )
    demo.set_defaults(func=_demo)
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
