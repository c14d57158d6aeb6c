"""One turn of waitress's event loop, with the poll set kept in the kernel between turns.

waitress's own turn (`wasyncore.poll2`) builds a new poll set every time: it asks every open
connection `readable()` and `writable()`, so a turn costs time in proportion to the keep-alive
clients, and one request takes several turns (its bytes arriving, the wake-up when its answer
is ready, the write). Profiled at 32 clients (docs/performance-design.md), that loop was 31% of
the Python time of a process, all of it holding the GIL that the request threads wait for.

`EventLoop.turn` does what poll2 does, with a level-triggered epoll set (the same event bits as
poll) that keeps each descriptor's interest between turns, and asks only the dispatchers whose
answer can have changed since the last turn:

- those that had an event in the last turn (their handlers ran);
- those added to or removed from the socket map (`WatchedMap` records them);
- those a request thread changed (`touched`, called before it wakes the loop: waitress wakes
  the loop whenever a thread changes what a connection waits for);
- the few that are not connections (listening socket, wake-up pipes), on every turn: the
  server's `readable()` runs its maintenance and enforces the connection limit;
- everyone, after a maintenance pass (timeouts mark connections to close) and at least every
  `SWEEP_S` seconds, so a change made without a wake-up is late by at most that.
"""
from __future__ import annotations

import collections
import errno
import select
import time
from typing import Any, Callable

from waitress import wasyncore
from waitress.channel import HTTPChannel

SWEEP_S = 1.0
READ = select.POLLIN | select.POLLPRI
WRITE = select.POLLOUT


class WatchedMap(dict):
    """waitress's socket map (descriptor -> dispatcher) that remembers which entries changed."""

    def __init__(self) -> None:
        super().__init__()
        self.changed: set[int] = set()
        # Called as a descriptor leaves the map, while it is still open: wasyncore's close()
        # removes the dispatcher before it closes the socket.
        self.on_delete: Callable[[int], None] = lambda fd: None

    def __setitem__(self, fd: int, dispatcher: Any) -> None:
        super().__setitem__(fd, dispatcher)
        self.changed.add(fd)

    def __delitem__(self, fd: int) -> None:
        super().__delitem__(fd)
        self.changed.add(fd)
        self.on_delete(fd)


def wanted_events(dispatcher: Any) -> int:
    """The poll bits `wasyncore.poll2` would register for this dispatcher now."""
    flags = READ if dispatcher.readable() else 0
    if dispatcher.writable() and not dispatcher.accepting:  # a listening socket is never "writable"
        flags |= WRITE
    return flags


class EventLoop:
    def __init__(self, socket_map: WatchedMap) -> None:
        self._map = socket_map
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}  # descriptor -> the bits registered for it
        self._always: set[int] = set()          # descriptors of dispatchers that are not connections
        self._had_events: set[int] = set()
        self._touched: collections.deque = collections.deque()  # appended by any thread
        self._next_sweep = 0.0
        # Unregister before the close: closing a descriptor drops it from the epoll set only
        # when no other descriptor (a dup, a child forked meanwhile) holds the same open file,
        # and a stale entry reports the old socket's events under a number now another's.
        socket_map.on_delete = self._forget

    def touched(self, dispatcher: Any) -> None:
        """A thread changed what this dispatcher waits for; call before waking the loop."""
        self._touched.append(dispatcher)

    def sweep_soon(self) -> None:
        """Ask every dispatcher in this turn (the server's maintenance marked some to close)."""
        self._next_sweep = 0.0

    def turn(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for events and handle them, like one `wasyncore.loop` turn."""
        socket_map = self._map
        changed, socket_map.changed = socket_map.changed, set()
        due = self._had_events | changed
        while self._touched:
            fd = self._touched.popleft()._fileno  # None once the dispatcher was closed
            if fd is not None:
                due.add(fd)
        for fd in changed:
            self._forget(fd)  # a descriptor number can now belong to another socket
            if isinstance(socket_map.get(fd), HTTPChannel) or fd not in socket_map:
                self._always.discard(fd)
            else:
                self._always.add(fd)
        for fd in self._always:  # first: the server's readable() may ask for a sweep
            self._update(fd)
        if time.monotonic() >= self._next_sweep:
            due = set(socket_map)
            self._next_sweep = time.monotonic() + SWEEP_S
        for fd in due:
            self._update(fd)
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        self._had_events = set()
        for fd, flags in events:
            dispatcher = socket_map.get(fd)
            if dispatcher is None:
                continue
            self._had_events.add(fd)
            wasyncore.readwrite(dispatcher, flags)

    def close(self) -> None:
        # Connections may still close after this (a request thread finishing, the server's
        # own close): closing the epoll set dropped them all, so there is nothing to unregister.
        self._map.on_delete = lambda fd: None
        self._registered.clear()
        self._epoll.close()

    def _update(self, fd: int) -> None:
        dispatcher = self._map.get(fd)
        flags = wanted_events(dispatcher) if dispatcher is not None else 0
        registered = self._registered.get(fd, 0)
        if flags == registered:
            return
        try:
            if not flags:
                self._epoll.unregister(fd)
            elif registered:
                self._epoll.modify(fd, flags)
            else:
                self._epoll.register(fd, flags)
        except FileNotFoundError:  # the kernel dropped it when it closed; the number is reused
            if flags:
                self._epoll.register(fd, flags)
        except FileExistsError:
            self._epoll.modify(fd, flags)
        except OSError as exc:
            if exc.errno != errno.EBADF or dispatcher is None:
                raise
            # Closed under the loop: poll() would say POLLNVAL, and waitress then closes it.
            self._registered.pop(fd, None)
            wasyncore.readwrite(dispatcher, select.POLLNVAL)
            return
        if flags:
            self._registered[fd] = flags
        else:
            self._registered.pop(fd, None)

    def _forget(self, fd: int) -> None:
        if self._registered.pop(fd, 0):
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: the kernel dropped it from the set itself
                pass
