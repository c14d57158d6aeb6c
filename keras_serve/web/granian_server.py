"""Serving over HTTP with granian (`--http-server granian`): connections handled in Rust, the
Flask app run on granian's Python threads.

Started from `keras_serve.cli` after the port is bound (a port in use still fails at once);
granian's main process then binds it again and forks WORKERS worker processes. Each worker
builds the app itself with `create_app` after the fork (TensorFlow's and ONNX Runtime's thread
pools do not survive a fork), listens on the port once it is loaded (its own socket,
SO_REUSEPORT: connections during the load are refused rather than queued, unlike waitress),
serves, and closes its service when it stops.

How this layer meets the server's hardening contract (docs/performance.md, "Choosing the HTTP
layer"), where it differs from waitress (`keras_serve.web.server`):

- Body size: the app refuses a Content-Length over the limit before reading the body (Flask's
  MAX_CONTENT_LENGTH), and a chunked body as soon as it passes the limit; the answer says
  `Connection: close`, since the rest of the body is never read.
- Slow clients: granian closes a connection whose request headers do not arrive within
  HEADER_TIMEOUT_S, and an idle keep-alive connection after the same time (granian has one
  clock for both; IDLE_TIMEOUT_S is not used for it); idle connections cost no thread. A request BODY that stalls
  completely holds one of the worker's Python threads until the client leaves or the server
  stops (granian has no body read timeout); one that trickles is cut off by the app
  (`BodyDeadline`) once it has taken longer than IDLE_TIMEOUT_S + HEADER_TIMEOUT_S.
- Refusals granian makes before the app sees the request (a malformed request line or header,
  a header section over its buffer) carry granian's own short answer, not the app's JSON.
- SIGTERM/SIGINT: /readyz answers 503 at once, the worker stops accepting, answers the requests
  in flight (their answers say `Connection: close`) and exits; granian's main process kills a
  worker still busy after SHUTDOWN_GRACE_S. A second signal stops at once.
"""
from __future__ import annotations

import io
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from functools import partial
from typing import Any, Callable, Iterable

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.server.mp import MPServer, WorkerProcess

from keras_serve.errors import IncompleteBodyError, RequestTimeoutError

log = logging.getLogger(__name__)

# granian's Python threads per worker ("blocking threads") that run the app: THREADS, as
# waitress's request threads. Measured at 8 clients on the full pipeline (docs/performance.md):
# 1, 4, 8 and 32 threads cost the same server CPU per request within the noise; and a request
# body that stalls holds its thread (see above), so one thread would let one stalled upload
# stop a worker.
# granian's read buffer per connection bounds a request's header section: a larger one is
# refused (431) or the connection closed, and never grows the worker's memory.
MAX_HEADER_BUFFER = 256 * 1024
# How often a worker's main thread wakes to run signal handlers (see _serve_wsgi_worker).
SIGNAL_CHECK_S = 0.1
# Signals that reached this worker process before it served (load_app).
STOPS_WHILE_LOADING: list[int] = []
# The exit status that makes `python app.py` report a worker that could not load the model.
WORKER_BOOT_ERROR = 3


class BodyDeadline:
    """wsgi.input with a deadline for the whole body: a body that trickles in (a byte every few
    seconds) is cut off once the deadline passes. A read that waits on a client sending nothing
    at all is not interrupted: granian gives no way to (see the module's docstring). A body that
    ends short of its Content-Length raises IncompleteBodyError, not a parse error blaming the form."""

    def __init__(self, stream: Any, deadline: float, expected: int | None = None) -> None:
        self.stream, self.deadline, self.expected = stream, deadline, expected
        self.received = 0

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            raise RequestTimeoutError("The request body took too long to arrive.")

    def _counted(self, data: bytes, size: int) -> bytes:
        self.received += len(data)
        if not data and size != 0 and self.expected is not None and self.received < self.expected:
            raise IncompleteBodyError(f"The request body ended after {self.received:,} of its {self.expected:,} bytes.")
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._read(self.stream.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._read(self.stream.readline, size)

    def _read(self, reader: Callable[[int], bytes], size: int | None) -> bytes:
        self._check()
        size = -1 if size is None else size
        try:
            data = reader(size)
        except Exception as exc:  # granian's stream fails when the connection ends under it
            raise IncompleteBodyError(f"The request body ended after {self.received:,} bytes.") from exc
        return self._counted(data, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


class RaisingBody:
    """The body of a request whose body already failed: reading it raises that failure again,
    inside the app, which answers it in its own format."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def read(self, size: int | None = -1) -> bytes:
        raise self.exc

    readline = read


class GranianAdapter:
    """The Flask app as granian serves it: a body deadline, chunked bodies measured against the
    limit before the app parses them, and `Connection: close` on answers after which the
    connection must not be reused (a body left unread, a stop under way)."""

    def __init__(self, flask_app: Any, body_seconds: float) -> None:
        self.flask_app = flask_app
        self.max_body_bytes = int(flask_app.config["MAX_CONTENT_LENGTH"])
        self.service = flask_app.extensions["classifier"]
        self.body_seconds = body_seconds
        self.draining = False

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        declared = environ.get("CONTENT_LENGTH")
        body = BodyDeadline(environ["wsgi.input"], time.monotonic() + self.body_seconds,
                            int(declared) if declared and declared.isdigit() else None)
        environ["wsgi.input"] = body
        if not environ.get("CONTENT_LENGTH") and environ.get("HTTP_TRANSFER_ENCODING"):
            self._measure_chunked(environ, body)

        def starting(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            if self.draining or status.startswith(("408", "413")):
                headers = [(k, v) for k, v in headers if k.lower() != "connection"] + [("Connection", "close")]
            return start_response(status, headers, exc_info)

        return self.flask_app(environ, starting)

    def _measure_chunked(self, environ: dict, body: BodyDeadline) -> None:
        """A chunked body, read up to one byte past the limit, as waitress does: the app then
        sees a Content-Length, so one over the limit gets the app's own 413 before it is parsed
        (Flask refuses a Content-Length over MAX_CONTENT_LENGTH), and one within it is parsed
        from memory (a temporary file past 512 KB)."""
        spooled = tempfile.SpooledTemporaryFile(max_size=512 * 1024)
        received = 0
        try:
            while received <= self.max_body_bytes and (
                    chunk := body.read(min(64 * 1024, self.max_body_bytes + 1 - received))):
                spooled.write(chunk)
                received += len(chunk)
        except RequestTimeoutError as exc:
            spooled.close()
            environ["wsgi.input"] = RaisingBody(exc)
            return
        spooled.seek(0)
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["CONTENT_LENGTH"] = str(received)
        environ["wsgi.input"] = spooled if received <= self.max_body_bytes else io.BytesIO()


def load_app(config: dict[str, Any], port: int, log_format: str) -> GranianAdapter:
    """Runs in each worker after the fork: its own app, model, batcher and store. `port`: the
    one bound (--port 0: the system's choice)."""
    from keras_serve import create_app
    from keras_serve.errors import StartupError
    from keras_serve.web.request_log import configure_logging

    # A stop while the model loads (the main process's inherited handlers would swallow it):
    # remembered, so the worker exits once loaded instead of serving until it is killed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOPS_WHILE_LOADING.append(signum))
    configure_logging(log_format)  # granian's worker set up its own logging after the fork
    try:
        flask_app = create_app(config)
    except StartupError as exc:
        print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr, flush=True)
        sys.exit(WORKER_BOOT_ERROR)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(WORKER_BOOT_ERROR)
    service = flask_app.extensions["classifier"]
    c = flask_app.config
    if int(config["WORKERS"]) == 1:  # the two start-up lines of one process, as with waitress
        from keras_serve.cli import announce

        announce(flask_app, port, threads_note="granian, threads")
    else:
        print(f"worker {os.getpid()} ready: {service.model.summary_line()}", flush=True)
    return GranianAdapter(flask_app, float(c["IDLE_TIMEOUT_S"]) + float(c["HEADER_TIMEOUT_S"]))


@WorkerProcess.wrap_target
def _serve_wsgi_worker(worker_id, callback, sock, ipc, loop, runtime_mode, runtime_threads, runtime_blocking_threads,
                       blocking_threads, blocking_threads_idle_timeout, backpressure, task_impl, http_mode,
                       http1_settings, http2_settings, websockets, static_path, log_access_fmt, ssl_ctx, scope_opts,
                       metrics):
    """granian's WSGI worker (granian.server.mp.MPServer._spawn_wsgi_worker, 2.8), but the first
    SIGTERM/SIGINT turns /readyz to 503 before the stop, the second exits at once, and the
    service (batcher, store) is closed once the last answer is out."""
    from granian._futures import _new_cbscheduler
    from granian._granian import WorkerSignal, WSGIWorker
    from granian.constants import TaskImpl
    from granian.server.common import WORKERS_METHODS
    from granian.wsgi import _callback_wrapper

    adapter: GranianAdapter = callback
    shutdown_event = WorkerSignal()
    stopped = threading.Event()
    signals: list[int] = []

    def on_signal(signum, frame) -> None:
        # granian's main process passes a stop on as SIGTERM, so a Ctrl-C reaches a worker twice
        # (the terminal's SIGINT, then that SIGTERM): only a second SIGINT means "stop now".
        if signum == signal.SIGINT and signal.SIGINT in signals:
            os._exit(1)
        signals.append(signum)
        adapter.service.ready = False  # /readyz answers 503 from this moment
        adapter.draining = True
        if len(signals) == 1:
            shutdown_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if STOPS_WHILE_LOADING:  # stopped while loading (checked after on_signal took over): nothing to serve
        adapter.service.close()
        return
    shutdown_event.add_cb(stopped.set)
    worker = WSGIWorker(worker_id, sock, ipc, runtime_threads, runtime_blocking_threads, blocking_threads,
                        blocking_threads_idle_timeout, backpressure, http_mode, http1_settings, http2_settings,
                        static_path, *ssl_ctx, metrics)
    serve = getattr(worker, WORKERS_METHODS[runtime_mode][(sock[0] or sock[1]).is_uds()])
    scheduler = _new_cbscheduler(loop, _callback_wrapper(adapter, scope_opts, log_access_fmt),
                                 impl_asyncio=task_impl == TaskImpl.asyncio)
    with adapter.service:
        serve(scheduler, loop, shutdown_event)  # serves on granian's threads; returns at once
        if signals:  # a stop that came while granian was starting: tell it again now that it listens
            shutdown_event.set()
        # Until granian has drained the connections after the signal. In slices: a signal that
        # the kernel hands to one of granian's threads does not wake this one, and only this
        # (main) thread runs Python's signal handlers, so a plain wait() could miss the stop.
        while not stopped.wait(SIGNAL_CHECK_S):
            pass


class KerasServeGranian(MPServer):
    """granian's multi-process server; a second SIGTERM/SIGINT kills the workers at once, and a
    worker is killed only if it is still running when the grace period is over."""

    def _stop_workers(self) -> None:
        # granian's own version joins each worker from two threads (its watcher's and this
        # one), so a worker that has exited can look alive and be reported as killed.
        from multiprocessing.connection import wait

        for worker in self.wrks:
            worker.terminate()
        deadline = time.monotonic() + (self.workers_kill_timeout or 0)
        running = {worker.inner.sentinel: worker for worker in self.wrks}
        while running and (left := deadline - time.monotonic()) > 0:
            for sentinel in wait(list(running), timeout=left):
                running.pop(sentinel)
        for worker in running.values():
            log.warning("grace period over: killing worker %d (pid %s) with requests unanswered",
                        worker.idx + 1, worker.inner.pid)
            worker.kill()
        for worker in self.wrks:
            worker.join()
        self.wrks.clear()

    def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
        # A worker runs this inherited handler until load_app installs its own: remembered there too.
        STOPS_WHILE_LOADING.append(signal.SIGTERM)
        if self.interrupt_signal:  # a second signal: stop every worker now
            for worker in list(self.wrks):
                worker.kill()
        super().signal_handler_interrupt(*args, **kwargs)


def _chosen_on_purpose(record: logging.LogRecord) -> bool:
    """granian warns of more Python threads than twice the cores: here they are THREADS, sized for
    requests that wait (a stalled body, the store), and a warning at every start would train
    people to ignore warnings."""
    return not record.getMessage().startswith("Configuration allows spawning up to")


def blocking_threads_for(config: dict[str, Any]) -> int:
    return max(1, int(config["THREADS"]))


def serve_granian(config: dict[str, Any], listening: socket.socket) -> int:
    """Run granian until SIGTERM/SIGINT; 0 after a clean stop, 2 if the workers could not start
    or keep running. `config`: the settings given (create_app's config), WORKERS decided."""
    from granian.log import LogLevels

    from keras_serve.web.server import connection_limit, raise_open_file_limit

    workers = int(config["WORKERS"])
    port = listening.getsockname()[1]  # --port 0: the port the system chose
    from keras_serve import settings as settings_module

    effective = settings_module.resolve(config)
    threads = blocking_threads_for(effective)
    if workers > 1:
        print(f"serving on http://{effective['HOST']}:{port}/ ({workers} worker processes under granian, "
              f"threads {threads} each, max batch {effective['MAX_BATCH']}, max wait {effective['MAX_WAIT_MS']} "
              f"ms, uploads in {effective['UPLOAD_DIR']})", flush=True)
    server = KerasServeGranian(
        target="keras_serve", address=str(effective["HOST"]), port=port, interface=Interfaces.WSGI,
        workers=workers, blocking_threads=threads,
        # granian's limit of connections served at once per worker: CONNECTION_LIMIT, capped by
        # the open-file limit as with waitress (idle keep-alive connections count, and cost no thread)
        backpressure=max(1, connection_limit(int(effective["CONNECTION_LIMIT"]), raise_open_file_limit()) // workers),
        http=HTTPModes.http1,  # HTTP/2 is a proxy's job here, as with waitress
        http1_settings=HTTP1Settings(header_read_timeout=int(float(effective["HEADER_TIMEOUT_S"]) * 1000),
                                     keep_alive=True, max_buffer_size=MAX_HEADER_BUFFER),
        backlog=2048, respawn_failed_workers=True,
        workers_kill_timeout=math.ceil(float(effective["SHUTDOWN_GRACE_S"])),
        log_level=LogLevels.warning, log_dictconfig={"loggers": {"_granian": {"level": "WARNING"},
                                                                  "granian.access": {"level": "WARNING"}}},
        process_name=None)
    from keras_serve.cli import log_format_for
    from keras_serve.web.request_log import configure_logging

    log_format = log_format_for(effective["LOG_FORMAT"], sys.stderr)
    configure_logging(log_format)  # granian set up its own
    logging.getLogger("_granian").addFilter(_chosen_on_purpose)
    # granian binds the port again itself: its main process checks it, then each worker listens
    # on its own socket (SO_REUSEPORT) once its model is loaded. Handing it this socket instead
    # (granian's path for other systems) measured a stop that never drains: the worker is killed
    # after the grace period. So the early socket only proves the port is free.
    listening.close()
    try:
        server.serve(spawn_target=_serve_wsgi_worker,
                     target_loader=partial(load_app, config, port, log_format), wrap_loader=False)
    except OSError as exc:  # taken in the instant between the two binds
        print(f"error: cannot listen on {effective['HOST']}:{port}: {exc.strerror or exc}; another process is "
              f"listening there: stop it or choose another port with --port", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(f"error: the worker processes could not start or keep running (granian exit status "
                  f"{exc.code}; see the lines above)", file=sys.stderr)
            return 2
    return 0
