"""Start `python app.py` as a real process on a free port, for end-to-end tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import requests

from keras_serve.tools.ports import free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:port (or `proc` exits: RuntimeError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """`python app.py` on a free port, ready (GET /readyz) when the constructor returns.

    `env` adds to (not replaces) this process's environment, `unset` names variables taken out
    of it; one process unless KERAS_SERVE_WORKERS or --workers says otherwise (as tests/conftest.py
    sets for the tests, so for the scripts here too). `wrapper` goes before the command (a program
    that sets something up, then execs the server, so signals still reach it); `script` replaces
    app.py (a path from the project root).
    """

    def __init__(self, *args: str, startup_timeout: float = 120.0, env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = (), script: str = "app.py", unset: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {"KERAS_SERVE_WORKERS": "1", **os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, script, "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={name: value for name, value in environment.items() if name not in unset})
        # Read the output as it comes: a server that logs more than a pipe holds (64 KB; libtiff
        # alone prints a line per damaged strip) would otherwise block in its next write.
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(10)
                raise RuntimeError(f"server exited with {self.proc.returncode}: {''.join(self._lines)}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if json.load(r).get("ready"):
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError("server did not become ready in time")

    def output(self) -> str:
        """What the server has printed so far (stdout and stderr), while it runs."""
        return "".join(list(self._lines))

    def output_once_it_says(self, text: str, timeout: float = 10.0) -> str:
        """`output()` once it contains `text`, or after `timeout`. A line the server wrote just
        after an answer reaches `output()` through a reader thread: it can lag the answer."""
        wait_until(lambda: text in self.output(), timeout, every=0.05)
        return self.output()

    def log_lines(self) -> list[dict]:
        """The JSON log lines printed so far (a pipe is not a terminal: every log line is one)."""
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def stop(self) -> str:
        # SIGTERM drains, then every worker unloads TensorFlow: on a loaded 2-core machine a
        # two-worker server measured 9-10 s from SIGTERM to the arbiter's last line.
        stop_process(self.proc, timeout=60)
        self._reader.join(10)
        return "".join(self._lines)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ready_pids(url: str, attempts: int = 200) -> set[int]:
    """Worker pids that answer /readyz as ready (a new connection each time, so the kernel
    spreads them over the workers)."""
    pids: set[int] = set()
    for _ in range(attempts):
        status = requests.get(url + "/readyz", headers={"Connection": "close"}, timeout=10).json()
        if status["ready"]:
            pids.add(status["pid"])
        if len(pids) >= 2:
            break
        time.sleep(0.05)
    return pids
