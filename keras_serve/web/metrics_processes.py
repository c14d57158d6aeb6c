"""Metrics with several server processes: hooks for the process manager that forks them.

prometheus-client decides how to keep values when it is first imported: in memory, or in
files under PROMETHEUS_MULTIPROC_DIR that `/metrics` adds up across processes. A worker
forked from a manager that had already imported it without the variable keeps in-memory
values, so this module imports prometheus_client only inside `child_exit`, and the manager
enters `share_between_processes()` before anything imports it:

    with metrics_processes.share_between_processes():   # in the manager, before forking
        ... run gunicorn with child_exit = metrics_processes.child_exit

or, in a gunicorn config file with PROMETHEUS_MULTIPROC_DIR set in the environment:

    on_starting = lambda server: metrics_processes.clear_multiprocess_dir()
    child_exit = metrics_processes.child_exit

A worker that got it wrong refuses to start (`keras_serve.web.metrics.init_app` checks).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def share_between_processes() -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR, emptied, for the workers forked inside the block.

    Emptied because files left by an earlier run's processes would still be added up. If the
    variable is unset, a private temporary folder is made, and removed when the block ends in
    this process (a forked worker leaving the block removes nothing).
    """
    made = not os.environ.get(MULTIPROC_ENV)
    if made:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="keras-serve-metrics-")
    folder = Path(os.environ[MULTIPROC_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    clear_multiprocess_dir()
    owner = os.getpid()
    try:
        yield folder
    finally:
        if made and os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]


def clear_multiprocess_dir() -> None:
    """Empty the shared folder (before the first worker starts; gunicorn's on_starting)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).is_dir():
        for entry in Path(path).iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook: a dead worker's in-progress requests stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
