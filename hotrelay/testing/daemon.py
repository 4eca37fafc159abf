"""The real ``hotrelay run`` process, for end-to-end tests and the demo.

It writes a config and rules into a private directory, starts the daemon as a child
process, waits until its control socket answers, and can reload it, kill it with
SIGKILL mid-flight and start it again on the same state. Everything it started is
stopped and reaped on close.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

from hotrelay.control.client import ControlClient, ControlError

__all__ = ["RunningDaemon", "eventually"]

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], *, timeout: float = 5.0, every: float = 0.01) -> T:
    """Poll ``probe`` until it returns something other than None/False; fail after timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and last is not False:
            return last
        time.sleep(every)
    raise TimeoutError(f"not true within {timeout} s (last: {last!r})")


class RunningDaemon:
    """``hotrelay run`` on private rules, state and socket paths."""

    def __init__(
        self,
        rules: Mapping[str, str],
        *,
        config: str = "",
        workdir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        echo_log: bool = True,
        command_prefix: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="hotrelay-e2e-"))
        self.workdir.chmod(0o755)
        self.rules_dir = self.workdir / "rules.d"
        self.state_dir = self.workdir / "state"
        self.socket = self.workdir / "control.sock"
        self.config_path = self.workdir / "hotrelay.toml"
        self.log_path = self.workdir / "daemon.log"
        self.rules_dir.mkdir(exist_ok=True)
        self.rules_dir.chmod(0o755)
        self.config_path.write_text(config)
        self.extra_args = extra_args
        # Runs the daemon under a wrapper (setpriv with the unit's capabilities).
        self.command_prefix = command_prefix
        self.echo_log = echo_log
        self.write_rules(rules)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def write_rules(self, rules: Mapping[str, str]) -> None:
        for old in self.rules_dir.glob("*.toml"):
            old.unlink()
        for name, text in rules.items():
            (self.rules_dir / name).write_text(text)

    def start(
        self, *, timeout: float = 20.0, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> RunningDaemon:
        """Start ``hotrelay run``; with ``wait``, return once its control socket answers."""
        argv = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "hotrelay",
            "run",
            "--config",
            str(self.config_path),
            "--rules",
            str(self.rules_dir),
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(self.socket),
            "--log-level",
            "debug",
            "--log-format",
            "text",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while the daemon runs
        self._log = log
        environ = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=environ
        )
        if not wait:
            return self
        try:
            eventually(self._answers, timeout=timeout, every=0.05)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"hotrelay run did not come up:\n{self.log()[-4000:]}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Until the daemon exits on its own (a crash test's SIGKILL); its status."""
        assert self.process is not None
        status = self.process.wait(timeout)
        self._close_log()
        return status

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"hotrelay run exited {self.process.returncode}:\n{self.log()[-4000:]}"
            )
        try:
            self.request("status")
        except (ControlError, OSError):
            return False
        return True

    def request(self, verb: str, **args: Any) -> Any:
        with ControlClient(self.socket, timeout=30) as client:
            return client.request(verb, **args)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("status")
        return result

    def grants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("list")
        return result

    def reload_signal(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def kill9(self) -> None:
        """SIGKILL: no cleanup at all, as after a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.process is None:
            return None
        status: int | None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                status = None
        else:
            status = self.process.returncode
        self._close_log()
        return status

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ledger(self) -> list[dict[str, Any]]:
        directory = self.state_dir / "ledger"
        if not directory.exists():
            return []
        entries = []
        for path in sorted(directory.glob("*.json")):
            try:
                entries.append(json.loads(path.read_text()))
            except FileNotFoundError:
                continue  # deleted between the listing and the read: undone meanwhile
        return entries

    def close(self) -> None:
        self.stop()
        if self.echo_log:
            # pytest shows captured output only for failing tests: there, the log says why.
            sys.stderr.write(f"--- hotrelay run log ({self.workdir}) ---\n{self.log()[-30000:]}\n")
        # Leftover host-side nodes of user-namespaced containers live in the state dir.
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)

    def __enter__(self) -> RunningDaemon:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
