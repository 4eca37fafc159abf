"""The ledger: durable, atomic, and tolerant of what a crash or a hand edit leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotrelay.daemon.ledger import Ledger, LedgerEntry, LedgerError


def entry(key: str, **record: object) -> LedgerEntry:
    return LedgerEntry(key=key, kind="grant", record=record)


def test_put_get_delete_and_reopen(tmp_path: Path) -> None:
    state = tmp_path / "ledger"
    with Ledger(state) as ledger:
        ledger.put(entry("lxc:ha /devices/x zigbee", rule="c 188:0 rwm"))
        ledger.put(entry("docker:z /devices/y cam", rule="c 81:0 rw"))
        ledger.put(entry("lxc:ha /devices/x zigbee", rule="c 188:1 rwm"))  # replaces
        ledger.delete("docker:z /devices/y cam")
        ledger.delete("never was")
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    with Ledger(state) as again:
        assert [e.record for e in again.entries()] == [{"rule": "c 188:1 rwm"}]
        got = again.get("lxc:ha /devices/x zigbee")
        assert got is not None
        assert got.kind == "grant"
        assert again.get("docker:z /devices/y cam") is None


def test_files_are_private(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l") as ledger:
        ledger.put(entry("k", a=1))
    (file,) = (tmp_path / "l").iterdir()
    assert file.stat().st_mode & 0o777 == 0o600


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    with pytest.raises(LedgerError, match="mode 0700"):
        Ledger(loose)


def test_corrupt_and_torn_files_cost_only_themselves(tmp_path: Path) -> None:
    state = tmp_path / "l"
    with Ledger(state) as ledger:
        ledger.put(entry("good", a=1))
        ledger.put(entry("bad", a=2))
    bad = next(p for p in state.iterdir() if json.loads(p.read_text())["key"] == "bad")
    bad.write_text(
        '{"key": "bad", "kind": "gr'
    )  # torn by hand: the rename protocol never does this
    (state / "moved.json").write_text(json.dumps({"key": "other", "kind": "grant", "record": {}}))
    (state / ".tmp-abc.json.123").write_text("half")  # a write that crashed before its rename
    with Ledger(state) as ledger:
        assert [e.key for e in ledger.entries()] == ["good"]
    assert not (state / ".tmp-abc.json.123").exists()


def test_entries_put_by_a_process_killed_with_sigkill_are_all_there(tmp_path: Path) -> None:
    state = tmp_path / "l"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from hotrelay.daemon.ledger import Ledger, LedgerEntry\n"
        "ledger = Ledger(Path(sys.argv[1]))\n"
        "for i in range(50):\n"
        "    ledger.put(LedgerEntry(f'k{i}', 'grant', {'i': i}))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(state)], check=False)
    assert result.returncode == -9
    with Ledger(state) as ledger:
        assert sorted(e.record["i"] for e in ledger.entries()) == list(range(50))
    assert [n for n in os.listdir(state) if n.startswith(".tmp-")] == []


def test_read_once_then_from_memory_and_a_callers_change_stays_its_own(tmp_path: Path) -> None:
    state = tmp_path / "ledger"
    with Ledger(state) as ledger:
        ledger.put(LedgerEntry("a", "binding", {"steps": [1]}))
    with Ledger(state) as ledger:
        # Read once when it opened: the heal pass never goes back to the files.
        for name in os.listdir(state):
            os.unlink(state / name)
        entry = ledger.get("a")
        assert entry is not None
        entry.record["steps"].append(2)  # changed, not written
        again = ledger.get("a")
        assert again is not None
        assert again.record == {"steps": [1]}
        assert [e.key for e in ledger.entries()] == ["a"]
        ledger.put(LedgerEntry("b", "binding", {}))
        ledger.delete("a")
        assert [e.key for e in ledger.entries()] == ["b"]
    with Ledger(state) as ledger:
        assert [e.key for e in ledger.entries()] == ["b"]  # and on disk too
