"""CI refuses skips: tests/refuse_skips.py turns any skip into a failed run under REFUSE_SKIPS=1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_runs():
    pass

def test_cannot_run_here():
    pytest.skip("needs a thing: apt-get install thing")
"""

SKIPPED_MODULE = """
import pytest
pytest.skip("needs a browser: apt-get install -y chromium", allow_module_level=True)
"""


def run_pytest(folder: Path, refuse: bool, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "REFUSE_SKIPS": "1" if refuse else "0",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "refuse_skips", "-q", "-rs", "-p", "no:cacheprovider",
                           *options, "-c", os.devnull, str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_skip_passes_on_a_developer_machine_and_fails_in_ci(tmp_path):
    (tmp_path / "test_skips_one.py").write_text(SKIPPING)
    (tmp_path / "test_skips_all.py").write_text(SKIPPED_MODULE)
    relaxed = run_pytest(tmp_path, refuse=False)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "1 passed, 2 skipped" in relaxed.stdout
    strict = run_pytest(tmp_path, refuse=True)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    report = strict.stdout[strict.stdout.index("REFUSE_SKIPS=1: skipped tests fail this run"):]
    # Both skips are named, each with the command that would enable it.
    assert "apt-get install thing" in report and "apt-get install -y chromium" in report


def test_a_run_without_skips_passes_in_ci(tmp_path):
    (tmp_path / "test_runs.py").write_text("def test_runs():\n    pass\n")
    done = run_pytest(tmp_path, refuse=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_skips_on_parallel_workers_fail_ci_too(tmp_path):
    """`make test` runs on pytest-xdist workers: their skips, a module's included, still fail the run."""
    (tmp_path / "test_skips_one.py").write_text(SKIPPING)
    (tmp_path / "test_skips_all.py").write_text(SKIPPED_MODULE)
    relaxed = run_pytest(tmp_path, False, "-p", "xdist.plugin", "-n", "2")
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "1 passed, 2 skipped" in relaxed.stdout
    strict = run_pytest(tmp_path, True, "-p", "xdist.plugin", "-n", "2")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    report = strict.stdout[strict.stdout.index("REFUSE_SKIPS=1: skipped tests fail this run"):]
    assert "apt-get install thing" in report and "apt-get install -y chromium" in report
    # .ci/run reads pytest's closing line for a skip count as well: it is still the last line.
    assert "2 skipped" in strict.stdout.strip().splitlines()[-1]
