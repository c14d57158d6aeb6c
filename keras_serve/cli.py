"""`python app.py [options]`: load the model once, then serve HTTP (keras_serve.web.server).

    python app.py                          # default cat/dog model on http://0.0.0.0:8080/, a process per CPU
    python app.py --workers 1              # one process
    python app.py --model my.h5 --labels a,b,c --port 9000

Every option is a row of `keras_serve.settings.SETTINGS`.
"""
from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import textwrap
from typing import IO, TYPE_CHECKING, Any

from keras_serve import settings
from keras_serve.worker_count import decide_workers

if TYPE_CHECKING:
    from flask import Flask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Raw: the description's examples and the groups' lists of variables keep their lines.
    p = argparse.ArgumentParser(prog="app.py", description=__doc__, epilog=textwrap.fill(settings.HELP_EPILOG, 78),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(p)
    return p.parse_args(argv)


def log_format_for(setting: str, stream: IO[Any]) -> str:
    """LOG_FORMAT's value as the handler takes it: auto is text for a person at a terminal,
    JSON lines for everything else (a pipe, a file, a container's log collector)."""
    if setting != "auto":
        return setting
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no stream, or a closed one
        return "json"


def bind(config: dict[str, Any]) -> socket.socket | None:
    """The listening socket, before anything slow happens; None (the reason printed) if the
    address cannot be had, so that a port in use fails the start at once, not after the load."""
    from keras_serve.web.listening import bind_listening_socket

    host, port = config["HOST"], int(config["PORT"])
    try:
        return bind_listening_socket(host, port)
    except ValueError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc}; check --host and --port (KERAS_SERVE_HOST, "
              f"KERAS_SERVE_PORT)", file=sys.stderr)
    except OSError as exc:
        hint = ("another process is listening there: stop it or choose another port with --port"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        given = settings.from_arguments(args)
        effective = settings.resolve(given)
    except ValueError as exc:  # a malformed KERAS_SERVE_* value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # First, and before the heavy imports below: a port in use fails the start at once.
    listening = bind(effective)
    if listening is None:
        return 2
    from keras_serve import create_app
    from keras_serve.errors import StartupError
    from keras_serve.web.request_log import configure_logging

    # JSON lines, or text at a terminal (keras_serve/web/request_log.py)
    configure_logging(log_format_for(effective["LOG_FORMAT"], sys.stderr))
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" is normal under load
    if effective.get("TRUST_MODEL_CODE"):  # a flag only (settings: never from the environment)
        from keras_serve.model.file_safety import TRUST_WARNING

        logging.getLogger("keras_serve.model").warning(TRUST_WARNING)
    # auto: one process per usable CPU as memory allows, said in one log line (keras_serve/worker_count.py)
    workers = decide_workers(effective)
    effective["WORKERS"] = given["WORKERS"] = workers
    if workers > 1 and effective.get("RATE_LIMIT") and str(effective["RATE_LIMIT_STORAGE_URI"]).startswith("memory:"):
        # Each worker counts alone (docs/access-control.md); with auto the count of workers may surprise.
        logging.getLogger("keras_serve.web.access").warning(
            "rate limit %s is counted in memory:// by each of %d worker processes, so a client may get up to %d "
            "times it; share one count with --rate-limit-storage redis://host:port/db, or use --workers 1",
            effective["RATE_LIMIT"], workers, workers)
    with listening:  # closed on every way out (serving closes it first, when it drains)
        try:
            if effective["HTTP_SERVER"] == "granian":  # its processes load the app after the fork
                from keras_serve.web.access import AccessSettings
                from keras_serve.web.granian_server import serve_granian

                AccessSettings.from_config(effective)  # a bad setting fails here, once
                return serve_granian(given, listening)
            if workers > 1:  # several processes: gunicorn forks them (keras_serve/workers.py)
                from keras_serve.web.access import AccessSettings
                from keras_serve.workers import serve_workers

                AccessSettings.from_config(effective)  # one line now, not one per worker after the fork

                return serve_workers(effective, listening)
            app = create_app(given)
        except StartupError as exc:
            print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr)
            return 2
        except ValueError as exc:  # a setting the app refuses
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return serve_one_process(app, listening)


def announce(app: Flask, port: int, threads_note: str = "threads") -> None:
    """The two start-up lines of one serving process, which tools and tests wait for: the model,
    then where it serves. One write per line, so that log lines from other threads never land
    inside one."""
    config = app.config
    sys.stdout.write(app.extensions["classifier"].model.summary_line() + "\n")
    sys.stdout.flush()
    sys.stdout.write(f"serving on http://{config['HOST']}:{port}/ ({threads_note} {config['THREADS']}, max batch "
                     f"{config['MAX_BATCH']}, max wait {config['MAX_WAIT_MS']} ms, uploads in "
                     f"{config['UPLOAD_DIR']})\n")
    sys.stdout.flush()


def serve_one_process(app: Flask, listening: socket.socket) -> int:
    service = app.extensions["classifier"]
    # Only now: the socket has listened since before the model loaded, and the loop starts next.
    announce(app, listening.getsockname()[1])  # --port 0: the port the system chose

    from keras_serve.web import server

    def stop_being_ready() -> None:
        service.ready = False  # /readyz answers 503 from the moment SIGTERM arrives

    with service:  # closes the batcher and the store once every answered request is out
        server.serve(app, on_drain=stop_being_ready, listening=listening)
    return 0
