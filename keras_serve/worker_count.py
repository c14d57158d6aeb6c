"""`--workers auto` (the default): one server process per usable CPU, as many as memory holds.

Usable CPUs are `keras_serve.model.engines.usable_cores`: the affinity capped by the cgroup's
CPU quota. Each worker loads TensorFlow to read the model and then serves from ONNX Runtime:
about 750 MiB resident once ready, plus up to its own decode budget while large images decode
(docs/performance-design.md, "Memory per worker"). Auto starts no more workers than the
memory available now holds at that worst case, and says so at start-up when that is fewer than
the CPUs. Only the process launcher (`keras_serve.cli`) decides this; an app made in-process by
`create_app` is one process whatever the setting says.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from keras_serve.model.engines import cgroup_folders, usable_cores

log = logging.getLogger(__name__)

AUTO = "auto"
MIB = 1024 * 1024
# Resident memory of one ready worker before any image decodes, measured with the default
# model (docs/performance-design.md); a larger model takes more, hence the log line naming it.
WORKER_BASE_BYTES = 750 * MIB
# cgroup v1 writes "no limit" as a huge number (the largest page-aligned 64-bit value).
_NO_V1_LIMIT = 1 << 60


class WorkersValueError(ValueError, argparse.ArgumentTypeError):
    """A bad WORKERS value; as argparse's own type error, `--workers` prints this message
    rather than argparse's 'invalid parse_workers value'."""


def parse_workers(text: str | int) -> int | str:
    """WORKERS from a flag or the environment: "auto" or a whole number, 1 or more."""
    value = str(text).strip().lower()
    if value == AUTO:
        return AUTO
    try:
        count = int(value)
    except ValueError:
        raise WorkersValueError(f"expected auto or a number of processes (1 or more), got {text!r}") from None
    if count < 1:
        raise WorkersValueError(f"expected auto or a number of processes (1 or more), got {text!r}")
    return count


def processes_in(config: Mapping[str, Any]) -> int:
    """How many server processes share this machine's cores, as the config says: "auto" in a
    config means the launcher has not decided, so the app is one process (create_app in-process)."""
    try:
        value = parse_workers(config.get("WORKERS") or 1)
    except ValueError:
        return 1  # create_app refuses nothing for it: only the launcher acts on WORKERS
    return value if isinstance(value, int) else 1


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    cpus: int
    per_worker_bytes: int
    available_bytes: int | None  # None: unknown, so memory did not limit the count

    @property
    def limited_by_memory(self) -> bool:
        return self.workers < self.cpus

    def message(self) -> str:
        count = f"{self.workers} worker process{'es' if self.workers != 1 else ''}"
        cpus = f"{self.cpus} usable CPU{'s' if self.cpus != 1 else ''}"
        each = (f"up to {self.per_worker_bytes // MIB:,} MiB per worker: {WORKER_BASE_BYTES // MIB} MiB model and "
                f"runtime + {(self.per_worker_bytes - WORKER_BASE_BYTES) // MIB:,} MiB decode budget")
        if self.available_bytes is None:
            return f"workers auto: {count} for {cpus} (memory available unknown)"
        memory = f"{self.available_bytes // MIB:,} MiB of memory available, {each}"
        if self.limited_by_memory:
            return (f"workers auto: only {count} for {cpus}, as memory allows ({memory}); lower --decode-budget-mb, "
                    f"add memory, or set --workers")
        return f"workers auto: {count} for {cpus} ({memory})"


def plan_workers(decode_budget_bytes: int, root: str | Path = "/") -> WorkerPlan:
    """One worker per usable CPU, fewer where the available memory would not hold them."""
    cpus = usable_cores(root)
    per_worker = WORKER_BASE_BYTES + max(0, int(decode_budget_bytes))
    available = available_memory(root)
    workers = cpus if available is None else max(1, min(cpus, available // per_worker))
    return WorkerPlan(workers, cpus, per_worker, available)


def decide_workers(config: Mapping[str, Any], root: str | Path = "/") -> int:
    """WORKERS as a number for the launcher; "auto" is decided here and said in one log line
    (a warning when memory holds fewer workers than there are CPUs)."""
    value = config.get("WORKERS", AUTO)
    if value != AUTO:
        return int(value)
    plan = plan_workers(int(config["DECODE_BUDGET_BYTES"]), root)
    log.log(logging.WARNING if plan.limited_by_memory else logging.INFO, plan.message())
    return plan.workers


def available_memory(root: str | Path = "/") -> int | None:
    """Bytes this process could still take: MemAvailable from /proc/meminfo, capped by what its
    cgroup (and each parent) allows beyond what it uses already; None if neither is readable."""
    candidates = [value for value in (meminfo_available(root), cgroup_memory_headroom(root)) if value is not None]
    return min(candidates, default=None)


def meminfo_available(root: str | Path = "/") -> int | None:
    try:
        for line in (Path(root) / "proc" / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == "MemAvailable":
                return int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_headroom(root: str | Path = "/") -> int | None:
    """The smallest (limit - working set) over this process's cgroup and its parents; the
    working set leaves out inactive file cache, which the kernel reclaims before it kills."""
    headrooms = []
    for folder in cgroup_folders(root, "memory"):
        v2 = (folder / "memory.max").is_file()
        try:
            limit_text = (folder / ("memory.max" if v2 else "memory.limit_in_bytes")).read_text().strip()
            if limit_text == "max" or int(limit_text) >= _NO_V1_LIMIT:
                continue
            usage = int((folder / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text().strip())
        except (OSError, ValueError):
            continue
        headrooms.append(max(0, int(limit_text) - max(0, usage - _inactive_file(folder, v2))))
    return min(headrooms, default=None)


def _inactive_file(folder: Path, v2: bool) -> int:
    key = "inactive_file" if v2 else "total_inactive_file"
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
