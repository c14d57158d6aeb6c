"""tests/suite_kinds.py marks tests by what they start, so `make check` can leave those out."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = '''
import subprocess

import pytest


@pytest.fixture(params=["sqlite+files", "postgresql+s3"])
def storage_config(request):
    return request.param


@pytest.fixture()
def browser():
    return None


def run_a_command():
    return subprocess.run(["true"])


def test_pure_arithmetic():
    assert 1 + 1 == 2


def test_runs_a_command_through_a_helper():
    run_a_command()


def test_on_each_back_end(storage_config):
    pass


def test_in_a_browser(browser):
    pass


def test_asks_for_an_engine_by_name(request):
    request.getfixturevalue("postgres")


@pytest.mark.training
def test_marked_by_hand():
    pass
'''


def run_pytest(folder: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_kinds", *options, "-q", "-c", os.devnull,
                           "-W", "ignore", str(folder)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)


def selected(folder: Path, expression: str, *options: str) -> list[str]:
    done = run_pytest(folder, "-p", "no:cacheprovider", *options, "--collect-only", "-m", expression)
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: nothing selected
    return sorted(line.split("::", 1)[1] for line in done.stdout.splitlines() if "::" in line)


def test_each_test_is_marked_with_what_it_starts_and_check_keeps_the_rest(tmp_path):
    (tmp_path / "test_kinds.py").write_text(SUITE)
    assert selected(tmp_path, "not (engines or processes or browser or training)") == [
        "test_on_each_back_end[sqlite+files]", "test_pure_arithmetic"]
    assert selected(tmp_path, "engines") == ["test_asks_for_an_engine_by_name", "test_on_each_back_end[postgresql+s3]"]
    assert selected(tmp_path, "processes") == ["test_runs_a_command_through_a_helper"]
    assert selected(tmp_path, "browser") == ["test_in_a_browser"]
    assert selected(tmp_path, "training") == ["test_marked_by_hand"]


SPAWNS_OUT_OF_SIGHT = '''
import os


def test_runs_a_command_the_code_does_not_name():
    assert os.popen("echo hi").read() == "hi\\n"  # subprocess.Popen inside the standard library


def test_pure_arithmetic():
    assert 2 * 2 == 4
'''


def test_a_test_seen_starting_a_process_is_marked_from_then_on(tmp_path):
    (tmp_path / "test_hidden.py").write_text(SPAWNS_OUT_OF_SIGHT)
    fast = "not (engines or processes or browser or training)"
    cached = ("-p", "cacheprovider", "-p", "xdist.plugin")
    before = run_pytest(tmp_path, *cached, "--collect-only", "-m", fast)
    assert "test_runs_a_command_the_code_does_not_name" in before.stdout  # its code names no process
    done = run_pytest(tmp_path, *cached)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = run_pytest(tmp_path, *cached, "--collect-only", "-m", fast)
    assert "test_runs_a_command_the_code_does_not_name" not in listed.stdout
    assert "test_pure_arithmetic" in listed.stdout
    # On xdist workers the same is seen, and reported back to the process that keeps the cache.
    (tmp_path / ".pytest_cache").rename(tmp_path / "first-cache")
    done = run_pytest(tmp_path, *cached, "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = run_pytest(tmp_path, *cached, "--collect-only", "-m", fast)
    assert "test_runs_a_command_the_code_does_not_name" not in listed.stdout


def test_each_test_named_as_starting_a_process_through_the_app_still_exists():
    import ast

    from suite_kinds import STARTED_BY_THE_APP

    for file, names in STARTED_BY_THE_APP.items():
        tree = ast.parse((TESTS / file).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert names <= defined, f"{file} no longer defines {sorted(names - defined)}"
