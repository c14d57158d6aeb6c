"""Request ids, and one structured log line per request.

Every request gets an id: the client's (or its proxy's) `X-Request-ID` when it is sane -- 1 to
128 characters of A-Z a-z 0-9 . _ : - -- else 32 random hex digits. The id goes back in the
`X-Request-ID` header of every answer and in every error body (`error.request_id`), and it is
on every log line written while the request is handled.

Log lines are JSON by default (python-json-logger), one object per line:

    {"time": "2026-12-02T17:40:01.123Z", "level": "INFO", "logger": "keras_serve.access",
     "message": "POST /file/ 200", "request_id": "4f0c...", "method": "POST", "route": "/file/",
     "status": 200, "latency_ms": 12.31, "upload_id": "9b1d..."}

`route` is the URL rule (`/uploads/<upload_id>`), never the path the client sent; nothing from
the request's headers or body is logged (no tokens, cookies, Authorization), and the upload id
only when it has the form of one. A request that matched no rule (404, 405) has route
"unmatched" and its `path`, with anything that looks like an id masked (`/uploads/{id}/x`),
unprintable characters replaced, at most 200 characters, never the query string. An error
answer's line has its `error_code` (the body's `error.code`). LOG_FORMAT=text writes the same
lines for people.
"""
from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from typing import Any

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from keras_serve.storage.uploads import is_upload_id
from keras_serve.web.api_models import REQUEST_ID_PATTERN

REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
UNMATCHED_ROUTE = "unmatched"  # as the metrics label it: 404s and 405s have no rule
ACCESS_LOG = logging.getLogger("keras_serve.access")
# Fields of an access line, besides time, level, logger and message.
ACCESS_FIELDS = ("request_id", "method", "route", "status", "latency_ms", "upload_id", "error_code", "path")
MASKED_ID = "{id}"
LONGEST_LOGGED_PATH = 200
# What an id looks like inside a path segment: upload ids and sha256s (hex), UUIDs, numbers;
# a whole segment of 24+ token characters (a guessed key, a base64 id) too.
ID_IN_SEGMENT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                           r"|[0-9a-fA-F]{16,}|(?<![A-Za-z0-9])[0-9]+(?![A-Za-z0-9])")
TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9_=+~-]{24,}")


def masked_path(path: str) -> str:
    """A client's path fit for a log line: ids masked, only printable ASCII, bounded."""
    segments = [MASKED_ID if TOKEN_SEGMENT.fullmatch(segment) else ID_IN_SEGMENT.sub(MASKED_ID, segment)
                for segment in path[:4 * LONGEST_LOGGED_PATH].split("/")]
    text = "".join(c if " " < c < "\x7f" else "?" for c in "/".join(segments))
    return text[:LONGEST_LOGGED_PATH]


def request_id_from(sent: str | None) -> str:
    """The id a request is known by: what the client sent if it is sane, else a new one."""
    if sent and SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return secrets.token_hex(16)


def current_request_id() -> str:
    """This request's id (made on first use, so it exists even if a hook before ours failed)."""
    request_id = g.get("request_id")
    if request_id is None:
        request_id = g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    return request_id


def log_request(request_id: str, method: str | None, route: str | None, status: int, latency_ms: float,
                upload_id: str | None = None, error_code: str | None = None, path: str | None = None) -> None:
    """The one line per request (also written for the answers waitress gives itself). `path`:
    the client's, for a request that matched no route (masked here)."""
    if not ACCESS_LOG.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {"request_id": request_id, "method": method, "route": route, "status": status,
                              "latency_ms": round(latency_ms, 2)}
    if upload_id is not None and is_upload_id(upload_id):
        fields["upload_id"] = upload_id
    if error_code is not None:
        fields["error_code"] = error_code
    if path is not None:
        fields["path"] = masked_path(path)
    ACCESS_LOG.info("%s %s %d", method or "-", route or "-", status, extra=fields)


def init_app(app: Flask) -> None:
    """Register first, so the id and the clock start before any other hook runs."""

    @app.before_request
    def start_request() -> None:
        g.request_started = time.perf_counter()
        current_request_id()

    @app.after_request
    def tag_and_log(response: Response) -> Response:
        request_id = current_request_id()
        response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("request_started")
        latency_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        matched = request.url_rule is not None
        route = request.url_rule.rule if matched else UNMATCHED_ROUTE
        upload_id = g.get("upload_id") or (request.view_args or {}).get("upload_id")
        log_request(request_id, request.method, route, response.status_code, latency_ms, upload_id,
                    error_code=g.get("error_code"), path=None if matched else request.path)
        return response


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record logged while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_request_context():
            record.request_id = g.get("request_id")
        return True


class TextFormatter(logging.Formatter):
    """For people: the usual line, then the access fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{name}={getattr(record, name)}" for name in ACCESS_FIELDS
                 if name not in ("method", "route", "status") and getattr(record, name, None) is not None]
        return " ".join([line, *extra])


def json_formatter() -> logging.Formatter:
    return JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         datefmt="%Y-%m-%dT%H:%M:%S%z")


class StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, not the one of start-up (tests swap it; a
    background thread's late record must not meet a closed stream)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(log_format: str = "json", level: int = logging.INFO) -> None:
    """The process's log handler: one line per record on stderr, JSON (or text: LOG_FORMAT=text).
    Called again, it replaces its own handler only (a test runner's stay)."""
    handler = StderrHandler()
    handler.setFormatter(TextFormatter() if log_format == "text" else json_formatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, StderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
