"""Serving over HTTP: waitress, hardened against idle and slow clients, and stopped gracefully.

Per process: request threads (waitress) and one event loop that owns every client socket
(`keras_serve.web.event_loop`: waitress's turn, with its poll set kept in the kernel).
`serve` runs one process; with `--workers N`, gunicorn's workers (`keras_serve.workers`) each
run `run_server` on the listening socket they share. What this module adds to a plain
`waitress.serve`:

- Connections: poll() instead of select() (select cannot watch a descriptor above 1024), the
  open-file limit raised to its hard limit at start, a connection limit derived from it (so
  a thousand idle sockets cannot lock everyone out), an idle timeout, and a deadline for a
  request's headers (slowloris).
- Body size: waitress refuses a Content-Length over the limit as soon as the headers are in,
  and a chunked body as soon as it passes the limit; nothing is spooled first. After the
  413 the connection reads and discards what the client is still sending for a while
  ("lingering close"), so clients that send the whole body before reading (browsers,
  requests) see the 413 instead of a connection reset.
- waitress's own answers (400, 413, 431, 501, 505, 500) have the app's error body (JSON, or the
  error page for browsers) and its security headers.
- A request whose header lines end in a bare LF is answered 400 at once (waitress would wait
  for CRLF CRLF until the idle timeout); one in another version than HTTP/1.0 or 1.1 (an
  HTTP/2 preface) 505; a folded header line or Content-Length with Transfer-Encoding (request
  smuggling shapes) 400.
- Forwarded headers (X-Forwarded-For, -Proto) are passed to the app untouched: what they are
  worth is the app's decision (keras_serve.web.proxies, TRUSTED_PROXIES).
- `GET /healthz` and `/readyz` are answered by the event loop itself, not queued for a request
  thread: the app answers them from state in memory, so they take well under a millisecond even
  while every request thread waits on a hung store (a liveness probe must not fail then).
- SIGTERM/SIGINT: readiness turns false at once, the listening socket is closed (after
  accepting what is already in its backlog), every request already received is answered
  (responses say `Connection: close`), idle connections are closed, and the process
  returns when nothing is left or the grace period is over. A second signal stops at once.
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flask import Flask
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import BadRequest

from keras_serve.errors import error_code
from keras_serve.web.event_loop import EventLoop, WatchedMap
from keras_serve.web.listening import LISTEN_BACKLOG
from keras_serve.web.request_log import REQUEST_ID_HEADER, log_request, request_id_from
from keras_serve.web.responses import SECURITY_HEADERS, body_too_large_message, error_response

log = logging.getLogger(__name__)

# Descriptors kept free for everything that is not a client: listening socket, model and
# upload files, temp files for bodies over waitress's 512 KB in-memory buffer, wake-up pipes.
RESERVED_FDS = 256
# After an early error answer (413 before the body), read and discard what the client still
# sends for at most this long: browsers and `requests` send the whole body before reading,
# and closing on unread data makes the kernel send a reset that destroys the answer.
LINGER_S = 10.0
ACCEPT_BATCH = 64
# Bytes asked of a socket per read. waitress's 8 KB took four loop turns (each a poll, a
# dispatch and the GIL) for a typical 25-30 KB photo; 64 KB takes one, and stays under
# glibc's mmap threshold, so the short-lived read buffer never costs an mmap/munmap pair.
# Measured at 32 clients, 2 workers: about 0.2 ms less server CPU per upload (docs/performance.md).
RECV_BYTES = 64 * 1024
BARE_LF = re.compile(rb"(?<!\r)\n")
HTTP_VERSIONS = frozenset({"1.0", "1.1"})
# Answered in the event loop (see HardenedServer.add_task): the app must answer these from
# memory, never waiting on a lock, the model or the store.
LOOP_ANSWERED_PATHS = frozenset({"/healthz", "/readyz"})
# The channel a request thread is serving: its wake-ups of the loop name it (HardenedServer.pull_trigger).
_serving = threading.local()
ERROR_HINTS = {
    400: "Send a well-formed HTTP/1.1 request: header lines end in CRLF.",
    413: "Send a smaller file, or fewer files per request.",
    431: "Send fewer or shorter request headers.",
    501: "Send the body with Content-Length or Transfer-Encoding: chunked.",
    505: "Speak HTTP/1.1 to this server (or put a proxy that speaks HTTP/2 in front of it).",
    500: "This is a server problem; try again later.",
}


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    threads: int
    max_body_bytes: int            # a body of exactly this many bytes is accepted
    connection_limit: int          # at most this many open client connections
    idle_timeout_s: float          # close a connection with no request in flight after this
    header_timeout_s: float        # a request's headers must arrive within this
    shutdown_grace_s: float        # answer what was received within this after SIGTERM
    linger_s: float = LINGER_S

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ServerSettings":
        """From app.config; the connection limit is capped by the (raised) open-file limit."""
        return cls(
            host=config["HOST"], port=int(config["PORT"]), threads=int(config["THREADS"]),
            max_body_bytes=int(config["MAX_CONTENT_LENGTH"]),
            connection_limit=connection_limit(int(config["CONNECTION_LIMIT"]), raise_open_file_limit()),
            idle_timeout_s=float(config["IDLE_TIMEOUT_S"]), header_timeout_s=float(config["HEADER_TIMEOUT_S"]),
            shutdown_grace_s=float(config["SHUTDOWN_GRACE_S"]))


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (systemd and Docker leave soft at 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(requested: int, open_file_limit: int) -> int:
    return max(min(requested, open_file_limit - RESERVED_FDS), 64)


class HttpVersionNotSupported(BadRequest):
    code = 505
    reason = "HTTP Version Not Supported"


class StrictRequestParser(HTTPRequestParser):
    """waitress's parser, but a bare LF in the header section is a 400 at once, and a request
    line in any version but HTTP/1.0 or 1.1 (an HTTP/2 client's preface `PRI * HTTP/2.0`) a 505.
    Two request-smuggling shapes that waitress accepts are a 400 too (RFC 9112 allows a server
    to refuse both): a folded header line (obs-fold), which waitress would unfold where a proxy
    in front may not, and Content-Length together with Transfer-Encoding, where a proxy in front
    may frame the body by the other one."""

    def parse_header(self, header_plus: bytes) -> None:
        lines = header_plus.split(b"\r\n")[1:]
        if any(line[:1] in (b" ", b"\t") for line in lines):
            raise ParsingError("A header line is folded (starts with a space or tab); send each header on one line.")
        names = {line.split(b":", 1)[0].strip().lower() for line in lines if b":" in line}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise ParsingError("The request has both Content-Length and Transfer-Encoding; send one of them.")
        super().parse_header(header_plus)

    def received(self, data: bytes) -> int:
        scanned = len(self.header_plus)
        headers_were_finished = self.headers_finished
        consumed = super().received(data)
        if not self.completed and self.body_rcv is None and BARE_LF.search(self.header_plus, max(scanned - 1, 0)):
            self.parse_header(b"GET / HTTP/1.0\r\n")  # as waitress does for 431: a request to answer
            self.error = BadRequest("Header lines must end in CRLF, not a bare LF.")
            self.completed = True
        elif (self.headers_finished and not headers_were_finished and self.error is None
              and getattr(self, "version", None) not in HTTP_VERSIONS):
            # waitress would hand it to the app as HTTP/1.0 (the preface's PRI then gets a 404).
            self.error = HttpVersionNotSupported(f"HTTP/{self.version} is not spoken here; use HTTP/1.1.")
            self.completed = True
        return consumed


class AppErrorTask(ErrorTask):
    """waitress's error answers in the app's own format, with its security headers."""

    def execute(self) -> None:
        error = self.request.error
        status = error.code
        if status == 413:
            message = body_too_large_message(self.channel.server.settings.max_body_bytes)
        else:
            message = f"{error.reason}: {error.body}"
        # The app's error body (JSON, or the error page for a browser), built by the same code.
        code, hint = error_code(error.reason), ERROR_HINTS.get(status, "")
        accept = self.request.headers.get("ACCEPT", "")
        # Its own id like any request's: the client's if sane (waitress names headers in CGI style).
        request_id = request_id_from(self.request.headers.get("X_REQUEST_ID"))
        try:
            with self.channel.server.flask_app.test_request_context(
                    headers={"Accept": accept, REQUEST_ID_HEADER: request_id}):
                response = error_response(status, code, message, hint)
                body, content_type = response.get_data(), response.headers["Content-Type"]
        except Exception:  # this answer must not fail: the same JSON, by hand
            log.exception("could not render the %d page", status)
            body = json.dumps({"error": {"status": status, "code": code, "message": message, "hint": hint,
                                         "request_id": request_id}}).encode()
            content_type = "application/json"
        self.status = f"{status} {error.reason}"
        self.response_headers.append(("Content-Type", content_type))
        self.response_headers.append((REQUEST_ID_HEADER, request_id))
        self.response_headers.extend(SECURITY_HEADERS.items())
        self.set_close_on_finish()
        self.channel.linger_wanted = True  # the client may still be sending the body
        self.content_length = len(body)
        self.write(body)
        # No route: the request never reached the app. A request that failed to parse may have
        # no method yet. Latency: from its first byte to now.
        log_request(request_id, getattr(self.request, "command", None), None, status,
                    (time.monotonic() - self.channel.request_started) * 1000, error_code=code)


class DrainAwareTask(WSGITask):
    def build_response_header(self) -> bytes:
        if self.channel.server.draining:
            self.set_close_on_finish()  # tell the client this connection ends after this answer
        return super().build_response_header()


class HardenedChannel(HTTPChannel):
    parser_class = StrictRequestParser
    error_task_class = AppErrorTask
    task_class = DrainAwareTask
    linger_wanted = False
    linger_deadline: float | None = None
    request_started = 0.0
    receiving_thread: int | None = None  # the event loop's, while it parses this channel's input
    answer_in_loop = False               # set by HardenedServer.add_task

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.monotonic()
        self.receiving_thread = threading.get_ident()
        try:
            result = super().received(data)
            # Outside requests_lock (service() takes it): a health check answered right here;
            # a pipelined one behind it is then flagged again by add_task.
            while self.answer_in_loop:
                self.answer_in_loop = False
                self.service()
        finally:
            self.receiving_thread = None
        return result

    def service(self) -> None:
        _serving.channel = self
        try:
            super().service()
        finally:
            _serving.channel = None

    def is_loop_answered(self) -> bool:
        request = self.requests[0] if self.requests else None
        return (request is not None and request.error is None and request.command in ("GET", "HEAD")
                and request.path in LOOP_ANSWERED_PATHS and self.receiving_thread == threading.get_ident())

    def handle_close(self) -> None:
        if self.linger_wanted and self.connected:
            self.linger_wanted = False
            try:
                self.socket.shutdown(socket.SHUT_WR)  # the answer is out; say we send nothing more
            except OSError:
                return super().handle_close()
            self.will_close = self.close_when_flushed = False
            self.linger_deadline = time.monotonic() + self.server.settings.linger_s
            # A lingering channel polls differently; swapping its class keeps that check off
            # the readable()/writable() calls the loop makes for every channel on every turn.
            self.__class__ = LingeringChannel
            return
        super().handle_close()

    @property
    def busy(self) -> bool:
        """A request is being received, served or answered, or waits unread in the socket."""
        partial = self.request is not None and (self.request.header_plus or self.request.body_rcv is not None)
        return bool(self.requests or partial or self.total_outbufs_len or self.linger_deadline is not None
                    or self._unread_input())

    def _unread_input(self) -> bool:
        # A request can be in the kernel's buffer, sent just before SIGTERM and not read yet.
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing to read (EAGAIN), or the client is gone
            return False


class LingeringChannel(HardenedChannel):
    """A channel that answered early (413 before the body) and half-closed: until the client
    stops sending or the linger deadline passes, it reads and discards, then closes."""

    linger_deadline: float

    def readable(self) -> bool:
        return time.monotonic() < self.linger_deadline

    def writable(self) -> bool:  # "writable" only to get handle_write called, which closes
        return self.will_close or time.monotonic() >= self.linger_deadline

    def handle_read(self) -> None:
        try:
            self.recv(self.adj.recv_bytes)  # discarded; closes on EOF
        except OSError:
            self.handle_close()

    def handle_write(self) -> None:
        self.handle_close()

    def handle_close(self) -> None:
        HTTPChannel.handle_close(self)


class HardenedServer(TcpWSGIServer):
    channel_class = HardenedChannel
    draining = False

    accept_batch = ACCEPT_BATCH

    def __init__(self, flask_app: Flask, wsgi_app, settings: ServerSettings, adj: Adjustments,
                 listening: socket.socket | None = None, shared_listening: bool = True) -> None:
        self.flask_app = flask_app
        self.settings = settings
        socket_map = WatchedMap()
        self.event_loop = EventLoop(socket_map)
        super().__init__(wsgi_app, map=socket_map, adj=adj, _sock=listening, bind_socket=listening is None)
        if listening is not None and shared_listening:
            # Take one connection per turn, so a burst is spread over the processes sharing
            # the socket instead of landing on whichever woke first.
            self.accept_batch = 1

    def add_task(self, channel) -> None:
        """Queue the channel's next request for a request thread, unless it is a health check
        parsed by the event loop just now: the loop answers that itself once it lets go of the
        channel's lock, so it never waits behind requests that wait on the model or the store."""
        if isinstance(channel, HardenedChannel) and channel.is_loop_answered():
            channel.answer_in_loop = True
            return
        super().add_task(channel)

    def pull_trigger(self) -> None:
        """Wake the loop; from a request thread, also tell it which connection changed."""
        channel = getattr(_serving, "channel", None)
        if channel is not None:
            self.event_loop.touched(channel)
        super().pull_trigger()

    def maintenance(self, now: float) -> None:
        self.event_loop.sweep_soon()  # timeouts below mark connections to close
        super().maintenance(now)  # idle timeout
        cutoff = time.monotonic() - self.settings.header_timeout_s
        for channel in list(self.active_channels.values()):
            request = channel.request
            if request is not None and not request.headers_finished and channel.request_started < cutoff:
                channel.will_close = True  # headers trickling in too slowly: slowloris

    def handle_accept(self) -> None:
        # waitress accepts one connection per loop turn, and a turn costs time in proportion to
        # the open connections: a burst of thousands would queue for seconds. Take a batch.
        room = self.adj.connection_limit - len(self._map)
        self.accept_backlog(max(1, min(self.accept_batch, room)))

    def accept_backlog(self, most: int = 1 << 30) -> int:
        """Accept connections already waiting in the kernel's queue, up to `most`."""
        accepted = 0
        while accepted < most and (pair := self._accept_one()) is not None:
            conn, addr = pair
            self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
            accepted += 1
        return accepted

    def _accept_one(self):
        try:
            pair = self.accept()  # None when the queue is empty
        except OSError:  # EMFILE and the like: stop this batch, the loop comes back
            log.warning("accept() failed", exc_info=True)
            return None
        if pair is not None:
            try:
                self.set_socket_options(pair[0])
            except OSError:  # the client already left
                pair[0].close()
                return self._accept_one()
        return pair

    def stop_listening(self) -> None:
        self.accepting = False
        self.del_channel()
        self.socket.close()


def build_server(flask_app: Flask, settings: ServerSettings, wsgi_app=None,
                 listening: socket.socket | None = None, shared_listening: bool = True) -> HardenedServer:
    """Bound and listening. `wsgi_app` (default: the Flask app) serves requests, e.g. the app
    wrapped in middleware; `flask_app` renders the error answers waitress gives itself.

    `listening`: a socket already bound and listening, shared with other processes (gunicorn
    workers); each connection is then accepted by whichever process's loop takes it first.
    `shared_listening=False`: a socket bound early for this process only (keras_serve.web.listening).
    """
    adj = Adjustments(
        host=settings.host, port=settings.port, threads=settings.threads, ident="keras-serve",
        # waitress refuses Content-Length >= this (and a chunked body reaching it) before reading.
        max_request_body_size=settings.max_body_bytes + 1,
        connection_limit=settings.connection_limit,
        channel_timeout=max(1, round(settings.idle_timeout_s)),
        cleanup_interval=max(1, int(min(settings.idle_timeout_s, settings.header_timeout_s) / 4)),
        asyncore_use_poll=True,  # select() fails on descriptors above 1024
        # Forwarded headers reach the app as sent: keras_serve.web.proxies decides what they
        # are worth (TRUSTED_PROXIES), in the app, whatever server runs it. waitress would
        # otherwise delete them all, and a proxy's client address with them.
        clear_untrusted_proxy_headers=False,
        backlog=LISTEN_BACKLOG,
        recv_bytes=RECV_BYTES,
    )
    return HardenedServer(flask_app, wsgi_app or flask_app, settings, adj, listening=listening,
                          shared_listening=shared_listening)


def serve(flask_app: Flask, on_drain: Callable[[], None] = lambda: None,
          listening: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns how many connections were closed unanswered.

    `on_drain` runs inside the signal handler (keep it to setting a flag): it is how /readyz
    turns 503 before anything else happens. `listening`: the socket bound early
    (keras_serve.web.listening); without it, binds here and raises OSError if the address cannot be bound.
    """
    settings = ServerSettings.from_config(flask_app.config)
    server = build_server(flask_app, settings, listening=listening, shared_listening=False)
    signals = []

    def on_signal(signum, frame) -> None:
        signals.append(signum)
        on_drain()  # /readyz turns 503 now, before the loop even wakes up

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run_server(server, stopping=lambda: bool(signals), stop_now=lambda: len(signals) > 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_server(server: HardenedServer, stopping: Callable[[], bool], stop_now: Callable[[], bool] = lambda: False,
               heartbeat: Callable[[], None] | None = None, heartbeat_s: float = 1.0) -> int:
    """Run the event loop until `stopping()`, then drain (see `drain`); the signal handlers that
    make `stopping()` true are the caller's. Returns how many connections were closed unanswered.

    `heartbeat` (a gunicorn worker telling its arbiter it is alive) runs about every
    `heartbeat_s` seconds, not on every turn of the loop: it is a system call.
    """
    settings = server.settings
    timeout = settings.idle_timeout_s if heartbeat is None else min(heartbeat_s, settings.idle_timeout_s)
    wakeup = SignalWakeup(server._map)  # a signal wakes the loop, so stopping() is seen at once
    previous_wakeup_fd = signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)
    next_heartbeat = 0.0
    try:
        while not stopping():
            server.event_loop.turn(timeout)
            if heartbeat is not None and (now := time.monotonic()) >= next_heartbeat:
                heartbeat()
                next_heartbeat = now + heartbeat_s / 2
        return drain(server, settings.shutdown_grace_s, stop_now)
    finally:
        signal.set_wakeup_fd(previous_wakeup_fd)
        wakeup.close()
        server.event_loop.close()


class SignalWakeup(wasyncore.file_dispatcher):
    """A pipe in the event loop that the interpreter writes to on a signal, so poll() returns."""

    def __init__(self, socket_map: dict) -> None:
        read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        super().__init__(read_fd, socket_map)  # keeps its own duplicate of read_fd
        os.close(read_fd)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.recv(4096)  # the byte only woke the loop; the handler has already run

    def close(self) -> None:
        super().close()
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


def drain(server: HardenedServer, grace_s: float, stop_now: Callable[[], bool] = lambda: False) -> int:
    server.draining = True
    accepted = server.accept_backlog()
    server.stop_listening()
    deadline = time.monotonic() + grace_s
    in_flight = sum(ch.busy for ch in server.active_channels.values())
    log.info("stopping: no longer listening; answering %d connection(s) with requests in flight "
             "(%d just accepted), grace %.0f s", in_flight, accepted, grace_s)
    while time.monotonic() < deadline and not stop_now():
        for channel in list(server.active_channels.values()):
            if not channel.busy:
                channel.will_close = True
        if not server.active_channels:
            break
        wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)
    unanswered = sum(ch.busy for ch in server.active_channels.values())
    if unanswered:
        log.warning("grace period over: closing %d connection(s) with requests unanswered", unanswered)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
    for channel in list(server.active_channels.values()):
        channel.close()
    server.close()  # the trigger; the listening socket is already closed
    return unanswered
