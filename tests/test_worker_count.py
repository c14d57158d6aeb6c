"""`--workers auto`: usable CPUs (affinity and cgroup CPU quota) and the memory cap, read from a
fake /proc and /sys tree; the process-level checks are in tests/test_workers.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from keras_serve import settings
from keras_serve.cli import parse_args
from keras_serve.model.engines import usable_cores
from keras_serve.worker_count import (MIB, WORKER_BASE_BYTES, available_memory, decide_workers, parse_workers,
                                      plan_workers, processes_in)

GIB = 1024 * MIB
BUDGET = 768 * MIB  # the default decode budget: 750 + 768 = 1,518 MiB per worker


def write(root: Path, path: str, text: str) -> None:
    file = root / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def cgroup_v2(root: Path, own: str = "/") -> Path:
    """A cgroup v2 tree with this process in `own`; returns the folder of `own`."""
    write(root, "proc/self/cgroup", f"0::{own}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    folder = root / "sys/fs/cgroup" / own.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def meminfo(root: Path, available_bytes: int) -> None:
    write(root, "proc/meminfo", f"MemTotal:       99999999 kB\nMemFree:  1 kB\n"
                                f"MemAvailable:   {available_bytes // 1024} kB\n")


@pytest.fixture
def cpus(monkeypatch):
    """Sets this process's affinity, as the code under test sees it, to range(n)."""
    def set_affinity(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    return set_affinity


# --- usable CPUs ---------------------------------------------------------------------------------
def test_without_a_cgroup_quota_the_affinity_counts(tmp_path, cpus):
    cpus(6)
    assert usable_cores(tmp_path) == 6  # nothing under /proc or /sys at all
    write(cgroup_v2(tmp_path), "cpu.max", "max 100000\n")
    assert usable_cores(tmp_path) == 6


@pytest.mark.parametrize("quota, expected", [("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1),
                                             ("800000 100000", 4)])
def test_a_cgroup_v2_quota_caps_the_affinity_rounding_down_to_at_least_one(quota, expected, tmp_path, cpus):
    cpus(4)
    (cgroup_v2(tmp_path) / "cpu.max").write_text(quota + "\n")
    assert usable_cores(tmp_path) == expected


def test_a_quota_on_a_parent_cgroup_binds_its_children(tmp_path, cpus):
    cpus(16)
    own = cgroup_v2(tmp_path, "/kubepods/pod7/container")
    (own / "cpu.max").write_text("max 100000\n")
    (own.parent / "cpu.max").write_text("300000 100000\n")  # the pod's limit
    (own.parent.parent / "cpu.max").write_text("1200000 100000\n")
    assert usable_cores(tmp_path) == 3


def test_cgroup_v1_quota_and_period(tmp_path, cpus):
    cpus(8)
    write(tmp_path, "proc/self/cgroup", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    # A container's own namespace mounts its cgroup as the root: /docker/abc is not there.
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "200000\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert usable_cores(tmp_path) == 2
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # no quota
    assert usable_cores(tmp_path) == 8


def test_an_unreadable_or_strange_cpu_max_is_no_limit(tmp_path, cpus):
    cpus(3)
    (cgroup_v2(tmp_path) / "cpu.max").write_text("banana\n")
    assert usable_cores(tmp_path) == 3


# --- the memory cap --------------------------------------------------------------------------------
def test_all_cpus_when_memory_holds_them(tmp_path, cpus, caplog):
    cpus(4)
    meminfo(tmp_path, 64 * GIB)
    with caplog.at_level(logging.INFO, "keras_serve.worker_count"):
        assert decide_workers({"WORKERS": "auto", "DECODE_BUDGET_BYTES": BUDGET}, tmp_path) == 4
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("workers auto: 4 worker processes for 4 usable CPUs (65,536 MiB of memory "
                                          "available, up to 1,518 MiB per worker")


def test_fewer_workers_when_memory_would_not_hold_one_per_cpu_and_a_warning_names_the_numbers(tmp_path, cpus,
                                                                                               caplog):
    cpus(8)
    meminfo(tmp_path, 8 * GIB)  # 8,192 MiB / 1,518 MiB = 5 workers
    with caplog.at_level(logging.INFO, "keras_serve.worker_count"):
        assert decide_workers({"WORKERS": "auto", "DECODE_BUDGET_BYTES": BUDGET}, tmp_path) == 5
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "only 5 worker processes for 8 usable CPUs" in message
    assert "8,192 MiB of memory available" in message and "1,518 MiB per worker" in message
    assert "768 MiB decode budget" in message and "--decode-budget-mb" in message and "--workers" in message


def test_a_smaller_decode_budget_fits_more_workers(tmp_path, cpus):
    cpus(8)
    meminfo(tmp_path, 8 * GIB)
    assert plan_workers(BUDGET, tmp_path).workers == 5  # 8,192 // 1,518
    assert plan_workers(256 * MIB, tmp_path).workers == 8  # 8,192 // 1,006: 8, one per CPU
    assert plan_workers(64 * MIB, tmp_path).workers == 8  # 10 would fit; 8 CPUs
    assert plan_workers(2 * GIB, tmp_path).workers == 2  # 8,192 // 2,798


def test_at_least_one_worker_however_little_memory(tmp_path, cpus):
    cpus(2)
    meminfo(tmp_path, 100 * MIB)
    plan = plan_workers(BUDGET, tmp_path)
    assert plan.workers == 1 and plan.limited_by_memory
    assert "only 1 worker process for 2 usable CPUs" in plan.message()


def test_the_cgroup_memory_limit_caps_what_meminfo_says(tmp_path, cpus):
    cpus(8)
    meminfo(tmp_path, 64 * GIB)  # the host's
    own = cgroup_v2(tmp_path, "/system.slice/app.service")
    (own / "memory.max").write_text(f"{4 * GIB}\n")
    (own / "memory.current").write_text(f"{1 * GIB}\n")
    (own / "memory.stat").write_text(f"anon 1\ninactive_file {512 * MIB}\nactive_file 3\n")
    # 4 GiB - (1 GiB used - 512 MiB reclaimable cache) = 3,584 MiB: 2 workers of 1,518 MiB
    assert available_memory(tmp_path) == 3584 * MIB
    assert plan_workers(BUDGET, tmp_path).workers == 2
    (own.parent / "memory.max").write_text(f"{2 * GIB}\n")  # a tighter parent binds
    (own.parent / "memory.current").write_text(f"{1 * GIB}\n")
    assert available_memory(tmp_path) == 1 * GIB
    assert plan_workers(BUDGET, tmp_path).workers == 1


def test_cgroup_v1_memory_limit_and_its_no_limit_value(tmp_path, cpus):
    cpus(4)
    meminfo(tmp_path, 64 * GIB)
    write(tmp_path, "proc/self/cgroup", "4:memory:/\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "none"
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{1 * GIB}\n")
    assert available_memory(tmp_path) == 64 * GIB
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{3 * GIB}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.stat", f"cache 5\ntotal_inactive_file {256 * MIB}\n")
    assert available_memory(tmp_path) == 3 * GIB - (1 * GIB - 256 * MIB)
    assert plan_workers(BUDGET, tmp_path).workers == 1  # 2,304 MiB holds one worker of 1,518


def test_memory_unknown_leaves_one_worker_per_cpu(tmp_path, cpus):
    cpus(3)
    plan = plan_workers(BUDGET, tmp_path)  # no /proc/meminfo, no cgroup
    assert plan.workers == 3 and plan.available_bytes is None
    assert plan.message() == "workers auto: 3 worker processes for 3 usable CPUs (memory available unknown)"
    assert plan.per_worker_bytes == WORKER_BASE_BYTES + BUDGET


# --- the setting -----------------------------------------------------------------------------------
def test_a_number_is_used_as_given_and_nothing_is_logged(tmp_path, cpus, caplog):
    cpus(8)
    meminfo(tmp_path, 1 * GIB)
    with caplog.at_level(logging.INFO, "keras_serve.worker_count"):
        assert decide_workers({"WORKERS": 3, "DECODE_BUDGET_BYTES": BUDGET}, tmp_path) == 3
    assert caplog.records == []


def test_workers_defaults_to_auto_and_takes_auto_or_a_number():
    assert settings.BY_NAME["WORKERS"].default == "auto"
    assert parse_args([]).WORKERS is None  # not given: the environment or the default decides
    assert parse_args(["--workers", "auto"]).WORKERS == "auto"
    assert parse_args(["--workers", "3"]).WORKERS == 3
    assert settings.from_environment({"KERAS_SERVE_WORKERS": "Auto"}) == {"WORKERS": "auto"}
    assert settings.from_environment({"KERAS_SERVE_WORKERS": "2"}) == {"WORKERS": 2}
    assert parse_workers(1) == 1


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "many", ""])
def test_a_bad_workers_value_is_refused_with_what_is_expected(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--workers", bad])
    assert exit_info.value.code == 2
    assert f"argument --workers: expected auto or a number of processes (1 or more), got {bad!r}" in (
        capsys.readouterr().err)
    with pytest.raises(ValueError, match=f"^KERAS_SERVE_WORKERS: expected auto or a number of processes"):
        settings.from_environment({"KERAS_SERVE_WORKERS": bad})


def test_an_app_made_in_process_is_one_process_whatever_the_setting():
    # create_app never forks: "auto" there is one process, so its engine gets every usable core
    assert processes_in({"WORKERS": "auto"}) == 1
    assert processes_in({}) == 1
    assert processes_in({"WORKERS": 4}) == 4
    assert processes_in({"WORKERS": "4"}) == 4
