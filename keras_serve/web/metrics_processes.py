"""Metrics with several server processes: hooks for the process manager that forks them.

prometheus-client decides how to keep values when it is first imported: in memory, or in
files under PROMETHEUS_MULTIPROC_DIR that `/metrics` adds up across processes. A worker
forked from a manager that had already imported it without the variable keeps in-memory
values, so this module imports prometheus_client only inside `child_exit`, and the manager
calls `share_between_processes()` before anything imports it:

    from keras_serve.web import metrics_processes
    metrics_processes.share_between_processes()   # in the manager, before forking
    ... gunicorn setting: child_exit = metrics_processes.child_exit

A worker that got it wrong refuses to start (`keras_serve.web.metrics.init_app` checks).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes() -> Path:
    """Use PROMETHEUS_MULTIPROC_DIR (a new private temp folder if unset), emptied; returns it.

    Emptied because files left by an earlier run's processes would still be added up.
    """
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="keras-serve-metrics-")
    folder = Path(os.environ[MULTIPROC_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    clear_multiprocess_dir()
    return folder


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
