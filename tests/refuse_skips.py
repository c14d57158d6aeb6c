"""A pytest plugin: with REFUSE_SKIPS=1 in the environment, any skipped test fails the run.

A test that cannot run on a machine skips with the command that enables it; CI (.ci/run)
sets REFUSE_SKIPS=1, so there a skipped test, or a skipped module, is a failure listed at the end.
"""
from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def _refusing() -> bool:
    return os.environ.get("REFUSE_SKIPS") == "1"


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    if _refusing() and _skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _refusing() and _skipped:
        terminalreporter.section("REFUSE_SKIPS=1: skipped tests fail this run", red=True)
        for line in _skipped:
            terminalreporter.write_line(line)
