"""A pytest plugin: marks each test with what it starts, and runs the costly test files first.

Markers (registered in pytest.ini), added from what a test uses, so a new test is sorted
without being told:
- engines: a real PostgreSQL, SeaweedFS, Redis or nginx (tests/services.py, the
  postgresql+s3 back end of `storage_config`);
- processes: a child process: `python app.py` (ServerProcess, the `server` fixture),
  a command line, gunicorn (anything that reaches `subprocess`);
- browser: Chromium through Playwright;
- training: a training run (keras_serve.training.train).
`make check` runs the rest: unit and in-process HTTP tests. A test may also carry a marker itself.

What a test uses is read from its code: the names its function, its fixtures, and every helper
defined under tests/ that they call (transitively) refer to. A name in the code, not a call
that ran: a test that merely mentions `subprocess` counts as starting one, which errs on
the side of keeping `make check` fast. What the app starts itself (a candidate model checked
in a child process) is not in the test's code: the tests known to make the app start one are
named in STARTED_BY_THE_APP, and a test seen starting a child process in an earlier run here
(pytest's cache) is marked `processes` too.

Under pytest-xdist with `--dist loadfile --no-loadscope-reorder` (the Makefile), files go to
workers in collection order; this plugin puts the files with the most starting tests first, so
the longest ones do not start last and leave one worker idle at the end: by what each file
took in the last run here (pytest's cache), else by a guess from its markers.
"""
from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Names that, anywhere in what a test runs, mean it starts that kind of thing.
STARTS = {
    "engines": {"running_postgres", "running_seaweedfs", "running_redis", "Postgres", "SeaweedFS",
                "running_nginx", "nginx_binary", "weed_binary", "postgres_bin"},
    "processes": {"subprocess", "Popen", "ServerProcess", "server_process", "multiprocessing"},
    "browser": {"sync_playwright", "chromium", "playwright"},
    "training": {"keras_serve.training.train"},
}
# Fixtures that mean the same (their own code is read too; these short-cut it).
FIXTURES = {
    "engines": {"postgres", "seaweedfs", "redis_server", "remote_storage_config"},
    "processes": {"server"},
    "browser": {"browser"},
}
# Tests whose app starts a child process their code does not name: the candidate check of a model
# published or promoted (keras_serve/model/candidate_check.py), 3-4 s of CPU each. Whether one
# starts in a given run depends on what its process checked before (results are kept per file), so
# a run's observation alone (pytest's cache, below) misses some, and a fresh checkout knows none.
# By file name under tests/, then test function name (every parameter of it); tests/test_suite_kinds.py
# checks each named test still exists.
STARTED_BY_THE_APP = {
    "test_candidate_check.py": {
        "test_a_model_needing_gigabytes_is_refused_by_its_budget_while_the_server_keeps_answering",
        "test_a_layer_declared_gigabyte_sized_is_refused_by_the_memory_budget_on_the_cli",
        "test_a_slow_model_is_refused_with_both_numbers_and_published_with_force_on_the_cli",
        "test_a_model_taking_more_memory_than_the_ratio_allows_is_refused_with_both_numbers",
        "test_a_model_that_takes_too_long_is_stopped_and_refused",
        "test_a_model_answering_a_white_photo_with_no_probability_is_refused_naming_the_probe",
        "test_a_refusal_names_the_published_file_never_the_folder_it_was_checked_in",
    },
    "test_model_versions.py": {
        "test_a_promoted_model_answers_without_a_restart_and_a_rollback_brings_the_old_one_back",
        "test_a_new_process_starts_on_the_promoted_version",
        "test_the_cli_refuses_a_candidate_with_other_labels_or_that_does_not_load",
        "test_a_version_the_server_refuses_keeps_the_old_model_and_the_api_rolls_it_back",
        "test_the_api_promotes_and_rolls_back",
        "test_publishing_over_http_checks_the_file_and_never_uses_its_name_as_a_path",
        "test_a_version_that_fails_its_warm_up_is_refused_once",
    },
    "test_model_file_safety.py": {
        "test_http_publish_answers_422_naming_the_layer_even_on_a_trusting_server",
        "test_the_weight_budget_setting_reaches_the_server_and_the_http_check",
    },
    "test_engine_file.py": {
        "test_an_int8_variant_is_published_promoted_and_rolled_back_like_any_version",
        "test_a_variant_its_card_marks_not_promotable_is_promoted_only_with_force",
    },
}
KINDS = tuple(STARTS)
# Rough seconds per test of each kind, for the file order only.
COST = {"engines": 3.0, "processes": 4.0, "browser": 6.0, "training": 8.0}


def _ours(obj, roots: frozenset[Path] = frozenset({TESTS})) -> bool:
    """Defined in a test folder (tests/, or the folder of a collected test file)."""
    try:
        file = inspect.getfile(obj)
    except TypeError:  # built in
        return False
    return _file_in(file, roots)


@functools.lru_cache(maxsize=None)
def _file_in(file: str, roots: frozenset[Path]) -> bool:
    """Once per file: resolving the path at every name looked up cost a quarter of a second per collection."""
    return file.endswith(".py") and any(Path(file).resolve().is_relative_to(root) for root in roots)


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names, and the strings given to request.getfixturevalue."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _names(const)
        elif isinstance(const, str) and "getfixturevalue" in code.co_names:
            found.add("fixture:" + const)
    return found


class _Reader:
    """The names reachable from a function through helpers defined under tests/, memoised."""

    def __init__(self, roots: frozenset[Path]) -> None:
        self.cache: dict[types.CodeType, frozenset[str]] = {}
        self.roots = roots

    def ours(self, obj) -> bool:
        return _ours(obj, self.roots)

    def names(self, func, depth: int = 0) -> frozenset[str]:
        func = inspect.unwrap(func)
        code = getattr(func, "__code__", None)
        if code is None or depth > 6:
            return frozenset()
        if code in self.cache:
            return self.cache[code]
        self.cache[code] = frozenset()  # a cycle stops here
        found = set(_names(code))
        scope = getattr(func, "__globals__", {})
        # `from test_uploads import helper` inside the function: the helper is no global here.
        ours = [module for module in map(sys.modules.get, found) if module is not None and self.ours(module)]
        for name in list(found):
            target = scope.get(name)
            if target is None:
                target = next((getattr(m, name) for m in ours if hasattr(m, name)), None)
            if isinstance(target, types.ModuleType):
                if self.ours(target):
                    found.add(target.__name__)
                continue
            if inspect.isclass(target) and self.ours(target):
                for member in vars(target).values():
                    if inspect.isfunction(member):
                        found |= self.names(member, depth + 1)
            elif inspect.isfunction(target) and self.ours(target):
                found |= self.names(target, depth + 1)
        self.cache[code] = frozenset(found)
        return self.cache[code]


def kinds_of(item: pytest.Item, reader: _Reader) -> set[str]:
    kinds = {kind for kind in KINDS if item.get_closest_marker(kind)}
    path = Path(str(item.path)).resolve()
    if path.parent == TESTS and getattr(item, "originalname", item.name) in STARTED_BY_THE_APP.get(path.name, ()):
        kinds.add("processes")
    fixtures = set(getattr(item, "fixturenames", ()))
    kinds |= {kind for kind, names in FIXTURES.items() if names & fixtures}
    callspec = getattr(item, "callspec", None)
    if callspec and "postgresql+s3" in map(str, callspec.params.values()):
        kinds.add("engines")
    names = set(reader.names(item.function)) if isinstance(item, pytest.Function) else set()
    kinds |= {kind for kind, fixture_names in FIXTURES.items() if {"fixture:" + n for n in fixture_names} & names}
    info = getattr(item, "_fixtureinfo", None)
    for name in fixtures:
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            if reader.ours(fixturedef.func):
                names |= reader.names(fixturedef.func)
    kinds |= {kind for kind, starters in STARTS.items() if starters & names}
    return kinds


CACHE_KEY = "suite_kinds/file_seconds"
_seconds: Counter[str] = Counter()


def _file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    reader = _Reader(frozenset({TESTS, *(Path(str(item.path)).resolve().parent for item in items)}))
    guess: Counter[str] = Counter()
    for item in items:
        kinds = kinds_of(item, reader)
        for kind in kinds:
            item.add_marker(kind)
        guess[_file(item.nodeid)] += 0.1 + sum(COST[kind] for kind in kinds)
    # What each file took last time (pytest's cache, written below), else the guess. Every
    # xdist worker reads the same cache, so all collect the same order, as xdist requires.
    cache = getattr(config, "cache", None)
    measured = cache.get(CACHE_KEY, {}) if cache is not None else {}
    spawning = set(cache.get(SPAWNED_KEY, [])) if cache is not None else set()
    for item in items:
        if item.nodeid in spawning and not item.get_closest_marker("processes"):
            item.add_marker("processes")
            guess[_file(item.nodeid)] += COST["processes"]
    cost = {name: measured.get(name, seconds) for name, seconds in guess.items()}
    # Stable: tests keep their order inside a file; files go costliest first.
    items.sort(key=lambda item: -cost[_file(item.nodeid)])


SPAWNED_KEY = "suite_kinds/tests_that_start_processes"
SPAWNED = ("suite_kinds", "started a process")  # a user property: it travels from xdist workers
_running: list[str | None] = [None]
_spawned_here: set[str] = set()   # on the process that runs the test
_spawned: set[str] = set()        # on the process that writes the cache
_ran: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    if getattr(subprocess.Popen.__init__, "suite_kinds", False):
        return
    start = subprocess.Popen.__init__

    @functools.wraps(start)
    def noting(self, *args, **kwargs):
        if _running[0] is not None:
            _spawned_here.add(_running[0])
        start(self, *args, **kwargs)

    noting.suite_kinds = True
    subprocess.Popen.__init__ = noting


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    _running[0] = item.nodeid
    try:
        yield
    finally:
        _running[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    if call.when == "call" and item.nodeid in _spawned_here:
        item.user_properties.append(SPAWNED)
    yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[_file(report.nodeid)] += report.duration  # setup, call and teardown
    if report.when == "call":
        _ran.add(report.nodeid)
        if SPAWNED in map(tuple, report.user_properties):  # a list once it came from a worker
            _spawned.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    cache = getattr(config, "cache", None)
    if cache is None or hasattr(config, "workerinput"):
        return  # xdist's controller sees every report and writes for the workers
    if _ran:  # what ran now replaces what was known of it
        known_spawning = set(cache.get(SPAWNED_KEY, []))
        cache.set(SPAWNED_KEY, sorted((known_spawning - _ran) | _spawned))
    partial = (config.option.keyword or config.option.markexpr or config.option.maxfail
               or any("::" in arg for arg in config.args))
    if partial or exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not _seconds:
        return  # only whole files, run to the end, say how long a file takes
    known = cache.get(CACHE_KEY, {})
    cache.set(CACHE_KEY, {**known, **{name: round(s, 1) for name, s in _seconds.items()}})
