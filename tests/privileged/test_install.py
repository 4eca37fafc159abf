"""The README's install and no-systemd steps, run as a new user would run them.

``scripts/install`` into a scratch prefix (a real virtualenv, a real pip install of
this checkout), then the installed ``hotrelay`` checks the example rules and runs as a
background daemon: ``status``, ``reload``, and a SIGTERM that stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.privileged

CHECKOUT = Path(__file__).resolve().parents[2]


def test_install_script_then_run_without_systemd(tmp_path: Path) -> None:
    prefix, bindir = tmp_path / "opt", tmp_path / "bin"
    unitdir, confdir = tmp_path / "units", tmp_path / "etc"
    env = {
        **os.environ,
        "PREFIX": str(prefix),
        "BINDIR": str(bindir),
        "UNITDIR": str(unitdir),
        "CONFDIR": str(confdir),
    }
    env.pop("PYTHONPATH", None)  # the installed command must stand on its own
    result = subprocess.run(
        [str(CHECKOUT / "scripts" / "install")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    hotrelay = bindir / "hotrelay"
    assert hotrelay.resolve() == (prefix / "bin" / "hotrelay").resolve()
    unit = (unitdir / "hotrelay.service").read_text()
    assert f"ExecStart={hotrelay} run\n" in unit
    assert (confdir / "rules.d").is_dir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(hotrelay), *args], env=env, capture_output=True, text=True, timeout=60,
            check=False, cwd=tmp_path,
        )  # fmt: skip

    checked = run("check", str(CHECKOUT / "rules"))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Without systemd: in the background, as the README shows (private paths here).
    rules = confdir / "rules.d"
    (rules / "10-zigbee-dongle.toml").write_text(
        (CHECKOUT / "rules" / "10-zigbee-dongle.toml").read_text()
    )
    state, sock = tmp_path / "state", tmp_path / "control.sock"
    log = (tmp_path / "hotrelay.log").open("ab")
    daemon = subprocess.Popen(
        [str(hotrelay), "run", "--rules", str(rules), "--state-dir", str(state),
         "--socket", str(sock), "--log-format", "text"],
        env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            status = run("status", "--socket", str(sock), "--json")
            if status.returncode == 0:
                break
            assert daemon.poll() is None, (tmp_path / "hotrelay.log").read_text()
            assert time.monotonic() < deadline, status.stderr
            time.sleep(0.1)
        reloaded = run("reload", "--socket", str(sock))
        assert reloaded.returncode == 0, reloaded.stderr
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "hotrelay.log").read_text()
