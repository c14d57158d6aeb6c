"""What the upload store does when one of its halves fails or hangs: timeouts, a circuit
breaker per half, and health that is known without waiting on the store.

Each half (the records' database, the images' store) has a `ComponentHealth`: the newest
outcome of a call or a background check, and which calls are in flight since when. From
that alone:

- `/readyz` answers at once, whatever the store is doing: a half is up when its newest
  outcome was a success and nothing has waited on it longer than the store timeout.
- Uploads and reads go through `ComponentHealth.call`, a circuit breaker: once a call into a
  half has failed slowly (a timeout: the store hangs), or while a call has been waiting on it
  longer than the store timeout, requests get the 503 at once without touching the store,
  until a background check succeeds (or, with no checks running, one request tries again
  after `retry_after_s`). So a hung store ties up a request thread once per timeout, not all
  of them all the time. A store that refuses at once (connection refused, disk full) costs
  nothing to try, so then every request still tries and the first to succeed serves.
- `HealthMonitor` checks each half in its own background thread every interval (a write
  while it is down, so a full disk or a read-only database is not declared up by a read),
  and logs every change with its details. The public answer is ok / not ok per half.

See docs/storage-faults.md.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from keras_serve.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreTimeouts:
    """How long the store may keep a request thread (settings STORE_*)."""

    connect_s: float = 2.0   # open a connection (TCP + TLS + login)
    timeout_s: float = 3.0   # one statement or S3 request, waiting for its answer
    attempts: int = 2        # tries per S3 request, the first included

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "StoreTimeouts":
        defaults = cls()
        return cls(connect_s=float(config.get("STORE_CONNECT_TIMEOUT_S") or defaults.connect_s),
                   timeout_s=float(config.get("STORE_TIMEOUT_S") or defaults.timeout_s),
                   attempts=max(1, int(config.get("STORE_ATTEMPTS") or defaults.attempts)))


class ComponentHealth:
    """One half of the store as the request path and /readyz see it; thread-safe."""

    def __init__(self, name: str, label: str, stall_after_s: float, slow_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name              # "records" / "images": the key in /readyz
        self.label = label            # "upload database" / "image store": for messages
        self.stall_after_s = stall_after_s  # a call waiting longer than this: the store hangs
        self.slow_after_s = slow_after_s    # a failure that took longer: a timeout, opens the breaker
        self.clock = clock
        self._lock = threading.Lock()
        self._ok = True
        self._open = False            # the breaker: calls fail fast
        self.retry_after_s = stall_after_s  # while open and unmonitored, a request may try this often
        self.monitored = False        # a HealthMonitor checks it: only a check closes the breaker
        self._next_trial = -math.inf
        self._newest = -math.inf      # when the call or check that set `_ok` started
        self._in_flight: dict[int, float] = {}  # token -> start, calls and checks alike
        self._tokens = itertools.count()
        self._trial = False

    # -- what /readyz reads -------------------------------------------------------------

    def ok(self) -> bool:
        with self._lock:
            return self._ok and not self._stalled(self.clock())

    def breaker_open(self) -> bool:
        """Calls fail fast now, without touching the store (a metric: keras_serve_storage_breaker_open)."""
        with self._lock:
            return self._open or self._stalled(self.clock())

    def _stalled(self, now: float) -> bool:
        return bool(self._in_flight) and now - min(self._in_flight.values()) > self.stall_after_s

    def unavailable(self) -> StorageError:
        return StorageError(f"The {self.label} is not available right now, so nothing was stored or read.",
                            "Try again in a few seconds; if it keeps happening, tell the server's operator.")

    # -- the request path ----------------------------------------------------------------

    @contextmanager
    def call(self) -> Iterator[None]:
        """Around one real call into this half. Raises StorageError at once, without touching
        the store, while its last failure was a timeout (until a check succeeds), or while a
        call has been waiting on it for longer than the store timeout."""
        now = self.clock()
        trial = False
        with self._lock:
            if self._stalled(now):
                raise self.unavailable()
            if self._open:
                if self.monitored or self._trial or now < self._next_trial:
                    raise self.unavailable()
                self._trial = trial = True  # nothing has checked for a while: this call does
                self._next_trial = now + self.retry_after_s
            token = next(self._tokens)
            self._in_flight[token] = now
        try:
            yield
        except StorageError as exc:
            self._settle(token, now, exc, trial)
            raise
        except BaseException:
            self._settle(token, now, None, trial, changes_state=False)  # a bug, not the store's state
            raise
        else:
            self._settle(token, now, None, trial)

    # -- the background check ---------------------------------------------------------------

    def check(self, probe: Callable[[bool], None]) -> bool:
        """Run `probe(write)` (write: the half is down, so prove it can take writes again)."""
        now = self.clock()
        with self._lock:
            write = not self._ok
            token = next(self._tokens)
            self._in_flight[token] = now
        error: StorageError | None = None
        try:
            probe(write)
        except StorageError as exc:
            error = exc
        except Exception as exc:  # whatever a client library raises, the check must not die
            log.exception("%s check failed unexpectedly", self.label)
            error = StorageError(f"The {self.label} check failed ({type(exc).__name__}).")
        # A read that works says nothing about writes: a read-only database or a full disk still
        # answers it. Had it counted, a read check begun while an upload's write was failing would
        # declare the half up, and every check after it would only read again.
        self._settle(token, now, error, changes_state=write or error is not None)
        return error is None

    def _settle(self, token: int, started: float, error: StorageError | None, trial: bool = False,
                changes_state: bool = True) -> None:
        with self._lock:
            self._in_flight.pop(token, None)
            if trial:
                self._trial = False
            if not changes_state or started < self._newest:
                return  # something that started later has already said how the store is
            self._newest = started
            was_ok, self._ok = self._ok, error is None
            now = self.clock()
            self._open = error is not None and now - started >= self.slow_after_s
            if self._open:
                self._next_trial = now + self.retry_after_s
        if was_ok and error is not None:
            log.warning("%s is down: %s (uploads are answered 503 and /readyz is 503 until it answers again)",
                        self.label, error.message)
        elif not was_ok and error is None:
            log.warning("%s answers again", self.label)


class HealthMonitor:
    """Checks each half every `interval_s` in its own daemon thread, until `stop`."""

    def __init__(self, checks: list[tuple[ComponentHealth, Callable[[bool], None]]], interval_s: float) -> None:
        self.checks = checks
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """One check of each half now (so readiness is known from the start), then the threads."""
        for component, probe in self.checks:
            component.check(probe)
            component.monitored = True
        for component, probe in self.checks:
            thread = threading.Thread(target=self._loop, args=(component, probe), daemon=True,
                                      name=f"store-check-{component.name}")
            thread.start()
            self._threads.append(thread)

    def _loop(self, component: ComponentHealth, probe: Callable[[bool], None]) -> None:
        while not self._stop.wait(self.interval_s):
            component.check(probe)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1)  # a check stuck on a hung store ends with its timeout; no need to wait
