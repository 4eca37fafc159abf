"""Running a runtime's command-line tool (LXC's are its API; podman without a socket)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

import trio

from hotrelay.runtimes.errors import RuntimeApiError, RuntimeUnavailable

__all__ = ["TOOL_TIME_LIMIT", "ToolResult", "find_tool", "run_tool"]

TOOL_TIME_LIMIT = 60.0


class ToolResult:
    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def check(self) -> ToolResult:
        if self.returncode != 0:
            raise RuntimeApiError(
                f"{' '.join(self.argv)} exited with {self.returncode}: {self.stderr.strip()[:500]}"
            )
        return self


def find_tool(name: str, path: str | None = None) -> str:
    """The tool's full path; RuntimeUnavailable if it is not installed."""
    found = shutil.which(name, path=path)
    if found is None:
        raise RuntimeUnavailable(f"{name} is not installed (not on PATH)")
    return found


async def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
) -> ToolResult:
    """Run argv to completion (stdin closed, output captured); never raises for a status.

    A tool that hangs for TOOL_TIME_LIMIT seconds is killed (trio.TooSlowError).
    """
    full_env = None if env is None else {**os.environ, **env}
    try:
        with trio.fail_after(TOOL_TIME_LIMIT):
            completed = await trio.run_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=full_env,
            )
    except FileNotFoundError as exc:
        raise RuntimeUnavailable(f"{argv[0]}: {exc.strerror}") from None
    return ToolResult(
        argv,
        completed.returncode,
        completed.stdout.decode(errors="replace"),
        completed.stderr.decode(errors="replace"),
    )
