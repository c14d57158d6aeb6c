"""How many bytes of decoded pixels may be in memory at once, across all requests.

Each decode reserves what it will allocate (estimated from the image header, before any pixel
is decoded) and gives it back when its full-size pixels are gone. Large images wait for their
turn instead of running the process out of memory; small ones, which reserve little, keep
flowing past them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from contextlib import contextmanager
from typing import Iterator

from keras_serve.errors import DecodeBusyError

# After a decode this large, hand glibc's freed pages back to the kernel (see release_free_memory).
TRIM_AFTER_BYTES = 32 * 2**20


class DecodeBudget:
    """A counting semaphore weighted by bytes; `reserve(n)` is its only way in."""

    def __init__(self, capacity_bytes: int, wait_seconds: float | None = None) -> None:
        if capacity_bytes < 1:
            raise ValueError("the decode budget must be at least one byte")
        self.capacity_bytes = int(capacity_bytes)
        self.wait_seconds = wait_seconds
        self._in_use = 0
        self._changed = threading.Condition()

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget for the block; waits while others hold too much.

        Raises DecodeBusyError if the budget does not free up within `wait_seconds`. A request
        larger than the whole budget waits until it has the budget to itself.
        """
        nbytes = min(max(int(nbytes), 0), self.capacity_bytes)
        with self._changed:
            if not self._changed.wait_for(lambda: self._in_use + nbytes <= self.capacity_bytes,
                                          timeout=self.wait_seconds):
                raise DecodeBusyError(
                    f"The server is busy decoding other large images (waited {self.wait_seconds:g} s).")
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()
            if nbytes >= TRIM_AFTER_BYTES:
                release_free_memory()


UNLIMITED = DecodeBudget(2**62)


def _glibc_function(name: str, *argtypes):
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_malloc_trim = _glibc_function("malloc_trim", ctypes.c_size_t)
_mallopt = _glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Make glibc share `arenas` heaps among all threads instead of up to 8 per core.

    With 64 request threads each large decode leaves its freed pages in the arena of the
    thread that ran it. Measured (memory_check --phase worst, 64 clients, 7000x7000 files):
    RSS 3 s afterwards was +17% of idle with glibc's default, -1% with 2 arenas, for the same
    peak. Call before the request threads start; the same as MALLOC_ARENA_MAX=2.
    """
    return bool(_mallopt and _mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> None:
    """Return freed heap pages to the kernel.

    glibc keeps freed memory in its per-thread arenas; after a large decode on one of 64
    request threads that memory would stay resident for good. malloc_trim(0) releases it.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
