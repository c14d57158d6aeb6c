"""`--workers N` (N > 1, or auto on more than one usable CPU; keras_serve/worker_count.py): N
server processes on one port, each with its own model and batcher.

Gunicorn's arbiter binds the port, forks the workers and restarts any that die. It forks
before anything heavy is imported (thread pools of TensorFlow and ONNX Runtime do not
survive a fork), so each worker loads the model itself through `create_app`. Each worker then
serves with the same hardened waitress server as a single process (`HardenedWorker`, through
`keras_serve.web.server`), so slow and idle clients, body limits, the error answers and the
graceful stop behave the same with one process or many. The workers share the listening
socket: each connection goes to whichever worker's event loop accepts it first, and a
keep-alive connection stays with it. One worker process (`--workers 1`, or auto with one
usable CPU) is served by `keras_serve.cli` with no arbiter in between.

Sizing (docs/performance.md): each worker's converted engine runs batches on cores / workers
threads and a lone input on every core (`keras_serve.model.engines.LoneInputSplit`).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer
from gunicorn.workers.base import Worker

from keras_serve import create_app
from keras_serve.errors import StartupError
from keras_serve.web import metrics_processes, server

log = logging.getLogger(__name__)

# gunicorn's Arbiter.WORKER_BOOT_ERROR: a worker exiting with it makes the arbiter stop
# instead of restarting the worker forever, and exit with the same status.
WORKER_BOOT_ERROR = 3
# How often a worker tells the arbiter it is alive (the arbiter's timeout is 180 s).
HEARTBEAT_S = 1.0


class HardenedWorker(Worker):
    """A gunicorn worker that serves with `keras_serve.web.server` on the inherited socket.

    gunicorn's signal handling stays, but for Ctrl-C: SIGTERM and SIGINT end the loop (`alive`
    turns false) and the server drains as a single process does; SIGQUIT stops at once.
    """

    def run(self) -> None:
        flask_app = self.wsgi
        [listener] = self.sockets  # one --host/--port
        settings = server.ServerSettings.from_config(flask_app.config)
        http_server = server.build_server(flask_app, settings, listening=listener.sock)
        server.run_server(http_server, stopping=lambda: not self.alive or self.ppid != os.getppid(),
                          heartbeat=self.notify, heartbeat_s=HEARTBEAT_S)

    def handle_quit(self, sig: int, frame: Any) -> None:
        # gunicorn stops at once on SIGINT as on SIGQUIT. Ctrl-C (SIGINT) drains as SIGTERM
        # does, as in one process; on a second Ctrl-C the arbiter sends SIGQUIT.
        if sig == signal.SIGINT:
            return self.handle_exit(sig, frame)
        super().handle_quit(sig, frame)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # /readyz answers 503 from this moment, before the loop wakes up to drain.
        flask_app = getattr(self, "wsgi", None)  # none yet while the model is loading
        if flask_app is not None:
            flask_app.extensions["classifier"].ready = False


class InterruptibleArbiter(Arbiter):
    """gunicorn's arbiter, but Ctrl-C (SIGINT) stops the workers gracefully, as SIGTERM does.

    gunicorn answers SIGINT with SIGQUIT to every worker (stop at once, requests in flight
    lost); this server's Ctrl-C answers what it has received, with one process or many.
    """

    def handle_int(self) -> None:
        self.handle_term()


class WorkerProcesses(BaseApplication):
    def __init__(self, config: dict[str, Any], listening_fd: int | None = None) -> None:
        self.app_config = config
        self.listening_fd = listening_fd  # bound already (keras_serve.cli); gunicorn takes it over
        self.service = None  # this worker's ClassifierService, once loaded
        super().__init__()

    def load_config(self) -> None:
        c = self.app_config
        for key, value in {
            # gunicorn's "fd://N": a socket bound before anything loaded, so a port in use failed
            # the start at once (gunicorn itself would retry for 5 s after printing nothing useful).
            "bind": f"fd://{self.listening_fd}" if self.listening_fd is not None else f"{c['HOST']}:{c['PORT']}",
            "workers": int(c["WORKERS"]),
            "worker_class": HardenedWorker,  # threads, limits and timeouts: from the settings, as one process
            # The worker drains for SHUTDOWN_GRACE_S itself; the arbiter kills it only after that.
            "graceful_timeout": math.ceil(float(c["SHUTDOWN_GRACE_S"])) + 5,
            # Loading TensorFlow and converting the model take a while; the arbiter must not
            # take a worker that is still loading for a hung one.
            "timeout": 180,
            "accesslog": None,
            "errorlog": "-",
            "proc_name": "keras-serve",
            # gunicorn 25+ opens a control socket (worker count, reload, shutdown) in $HOME or
            # $XDG_RUNTIME_DIR: an interface nobody asked for, shared by every server of the
            # same user, and a write to a home folder that a read-only container may not have.
            "control_socket_disable": True,
            "worker_exit": self._worker_exit,
            "child_exit": metrics_processes.child_exit,  # a dead worker's requests stop counting as in progress
        }.items():
            self.cfg.set(key, value)

    def run(self) -> None:
        try:
            InterruptibleArbiter(self).run()
        except RuntimeError as exc:  # as BaseApplication.run: e.g. a pid file that cannot be written
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)

    def load(self):
        """Runs in each worker after the fork: its own model, batcher and store."""
        try:
            app = create_app(self.app_config)
        except StartupError as exc:
            print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr, flush=True)
            sys.exit(WORKER_BOOT_ERROR)
        self.service = app.extensions["classifier"]
        print(f"worker {os.getpid()} ready: {self.service.model.summary_line()}", flush=True)
        return app

    def _worker_exit(self, arbiter: Any, worker: Any) -> None:
        if self.service is not None:
            self.service.close()


def serve_workers(config: dict[str, Any], listening: socket.socket | None = None) -> int:
    """Run the arbiter until SIGTERM/SIGINT; 0 after a clean stop, 2 if workers cannot start.

    `listening`: the socket to serve on, bound and listening (keras_serve.web.listening);
    gunicorn takes it over. Without it gunicorn binds HOST:PORT itself.
    """
    port = listening.getsockname()[1] if listening is not None else config["PORT"]
    listening_fd = listening.detach() if listening is not None else None  # gunicorn closes it
    print(f"serving on http://{config['HOST']}:{port}/ ({config['WORKERS']} worker processes "
          f"under gunicorn, threads {config['THREADS']} each, max batch {config['MAX_BATCH']}, "
          f"max wait {config['MAX_WAIT_MS']} ms, uploads in {config['UPLOAD_DIR']})", flush=True)
    arbiter_pid = os.getpid()
    try:
        # /metrics adds up every worker's counts from files in one folder (docs/operations.md, Metrics).
        with metrics_processes.share_between_processes():
            WorkerProcesses(config, listening_fd).run()
    except (SystemExit, HaltServer) as exc:
        if os.getpid() != arbiter_pid:
            raise  # a worker ending: its exit unwinds through the fork, and the arbiter reads its status
        # HaltServer escapes gunicorn itself when, while it halts for one worker that failed to
        # boot, it reaps a second that failed too (Arbiter.stop -> reap_workers raises again).
        status = exc.exit_status if isinstance(exc, HaltServer) else exc.code
        if status not in (None, 0):
            print(f"error: the worker processes could not start or keep running (gunicorn exit status "
                  f"{status}; see the lines above)", file=sys.stderr)
            return 2
    return 0
