"""Test policy shared by every test.

Tests marked ``privileged`` need root and the real kernel. Without root they skip,
unless ``HOTRELAY_REQUIRE_PRIVILEGED=1`` is set (CI sets it): then a privileged test
that would skip, for any reason, fails instead, so a green CI run means every
kernel-facing test really ran.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

pytest_plugins = ["hotrelay.testing.fixtures", "hotrelay.testing.runtime_fixtures"]


def privileged_required() -> bool:
    return os.environ.get("HOTRELAY_REQUIRE_PRIVILEGED", "") not in ("", "0")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None and os.geteuid() != 0:
        pytest.skip("needs root (privileged test)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and privileged_required()
        and item.get_closest_marker("privileged") is not None
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"privileged test skipped under HOTRELAY_REQUIRE_PRIVILEGED=1: {reason}"
    return report
