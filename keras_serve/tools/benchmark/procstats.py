"""Facts about the machine and readings from /proc: CPU model, CPU time, resident memory."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

def parse_vmrss_kb(status_text: str) -> int | None:
    """VmRSS in kB from the text of /proc/<pid>/status (None for a zombie / kernel thread)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def parse_cpu_ticks(stat_text: str) -> int:
    """utime+stime clock ticks from /proc/<pid>/stat text.

    The command name (field 2) may contain spaces and parentheses, so split after the last ')'.
    """
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_machine_ticks(proc_stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from the text of /proc/stat.

    Busy counts everything but idle and iowait, so kernel work done on the server's behalf
    (filesystem journal threads, loopback networking) is included, unlike per-process times.
    """
    for line in proc_stat_text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values[:8])  # guest time is already inside user time
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_model() -> str:
    """`lscpu`'s model name (what docs/performance.md quotes), else /proc/cpuinfo's."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (app.py might fork workers)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        task_dir = Path(f"/proc/{current}/task")
        try:
            for task in task_dir.iterdir():
                children = (task / "children").read_text().split()
                queue.extend(int(c) for c in children)
        except OSError:
            continue
    return pids


def rss_mb(pid: int) -> float:
    """Resident size of pid and its descendants, MiB."""
    total_kb = 0
    for member in process_tree(pid):
        try:
            total_kb += parse_vmrss_kb(Path(f"/proc/{member}/status").read_text()) or 0
        except OSError:
            pass
    return total_kb / 1024.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user+system) used so far by pid and its live descendants."""
    ticks = 0
    for member in process_tree(pid):
        try:
            ticks += parse_cpu_ticks(Path(f"/proc/{member}/stat").read_text())
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    return parse_machine_ticks(Path("/proc/stat").read_text())


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system

