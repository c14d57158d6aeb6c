"""The rate limiter's in-memory counts (`memory://`), bounded.

limits' MemoryStorage keeps a counter per key (per client address or token, per window) until
some later hit happens to reap it, and has no ceiling: a client cycling through IPv6 /64s
grows it for as long as it likes. This one drops expired counters at most SWEEP_INTERVAL_S
after they expire (on the next hit), and never holds more than `max_keys` counters: a new
key beyond that first evicts the counters closest to expiring. An evicted client starts
again from zero, which only ever lets a few more requests through; memory never grows past
the cap (about 270 bytes per counter).
"""
from __future__ import annotations

import heapq
import threading
import time
from typing import Any

from limits.storage import MemoryStorage

SCHEME = "keras-serve-memory"
DEFAULT_MAX_KEYS = 100_000
SWEEP_INTERVAL_S = 1.0


class BoundedMemoryStorage(MemoryStorage):
    STORAGE_SCHEME = [SCHEME]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, max_keys: int = DEFAULT_MAX_KEYS,
                 **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.max_keys = max(int(max_keys), 1)
        self._room_lock = threading.Lock()
        self._next_sweep = 0.0

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        self._make_room(key)
        return super().incr(key, expiry, amount)

    def __len__(self) -> int:
        return len(self.storage)

    def _make_room(self, key: str) -> None:
        now = time.time()
        full = key not in self.storage and len(self.storage) >= self.max_keys
        if now < self._next_sweep and not full:
            return
        with self._room_lock:
            self._next_sweep = now + SWEEP_INTERVAL_S
            for old, expires in list(self.expirations.items()):
                if expires <= now:
                    self._forget(old)
            excess = len(self.storage) - self.max_keys + 1
            if key not in self.storage and excess > 0:
                # Evict a few more than needed, so a flood does not pay for a scan on every hit.
                count = min(excess + self.max_keys // 100, len(self.storage))
                for old, _ in heapq.nsmallest(count, self.expirations.items(), key=lambda item: item[1]):
                    self._forget(old)

    def _forget(self, key: str) -> None:
        self.storage.pop(key, None)
        self.expirations.pop(key, None)
        self.locks.pop(key, None)
