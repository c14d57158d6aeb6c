"""The epoll event loop (keras_serve.web.event_loop) against real sockets.

It replaces waitress's `wasyncore.poll2`, which asked every dispatcher readable()/writable() on
every turn; these tests pin down both halves of the bargain: every event poll2 would deliver is
still delivered, and connections whose answer cannot have changed are really not asked again.
"""
from __future__ import annotations

import os
import socket
import threading

import pytest
import requests
from waitress import wasyncore
from waitress.channel import HTTPChannel

from keras_serve.web import event_loop
from keras_serve.web.event_loop import EventLoop, WatchedMap


class Recording:
    """readable()/writable() answer what the test sets; every call and handler is counted."""

    def setup(self, want_read: bool, want_write: bool) -> None:
        self.want_read, self.want_write = want_read, want_write
        self.asked = self.reads = self.writes = self.closes = 0
        self.received = b""

    def readable(self) -> bool:
        self.asked += 1
        return self.want_read

    def writable(self) -> bool:
        return self.want_write

    def handle_read(self) -> None:
        self.reads += 1
        self.received += self.recv(4096)

    def handle_write(self) -> None:
        self.writes += 1
        self.want_write = False  # as a channel that flushed its answer

    def handle_close(self) -> None:
        self.closes += 1
        wasyncore.dispatcher.close(self)

    def handle_error(self) -> None:  # wasyncore's default swallows the exception
        raise


class Connection(Recording, HTTPChannel):
    """Looks like a client connection to the loop (an HTTPChannel), without waitress's server."""

    def __init__(self, sock: socket.socket, socket_map: WatchedMap, want_read: bool = True,
                 want_write: bool = False) -> None:
        wasyncore.dispatcher.__init__(self, sock, socket_map)
        self.setup(want_read, want_write)

    # HTTPChannel's own also keep its server's table of channels, which this one has not.
    add_channel = wasyncore.dispatcher.add_channel
    del_channel = wasyncore.dispatcher.del_channel


class Other(Recording, wasyncore.dispatcher):
    """Not a connection: a listening socket or a wake-up pipe."""

    def __init__(self, sock: socket.socket, socket_map: WatchedMap, want_read: bool = True,
                 want_write: bool = False) -> None:
        wasyncore.dispatcher.__init__(self, sock, socket_map)
        self.setup(want_read, want_write)


@pytest.fixture
def loop(monkeypatch):
    """An empty map and its loop; the periodic sweep is off unless a test asks for it."""
    monkeypatch.setattr(event_loop, "SWEEP_S", 3600.0)
    socket_map = WatchedMap()
    the_loop = EventLoop(socket_map)
    peers: list[socket.socket] = []
    yield the_loop, socket_map, peers
    for dispatcher in list(socket_map.values()):
        dispatcher.close()
    for peer in peers:
        peer.close()
    the_loop.close()


def connect(kind, socket_map: WatchedMap, peers: list, **wants):
    """A dispatcher on one end of a socket pair; returns it and the other end (the 'client')."""
    ours, theirs = socket.socketpair()
    peers.append(theirs)
    return kind(ours, socket_map, **wants), theirs


def test_data_waiting_is_read_within_one_turn_only_by_a_readable_dispatcher(loop):
    the_loop, socket_map, peers = loop
    reading, client = connect(Connection, socket_map, peers)
    deaf, deaf_client = connect(Connection, socket_map, peers, want_read=False)
    client.sendall(b"GET")
    deaf_client.sendall(b"GET")
    the_loop.turn(0.1)
    assert (reading.reads, reading.received) == (1, b"GET")
    for _ in range(3):
        the_loop.turn(0)
    assert deaf.reads == 0 and reading.reads == 1  # nothing new for the one that read


def test_a_blocked_turn_wakes_for_data_sent_meanwhile(loop):
    the_loop, socket_map, peers = loop
    reading, client = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # registered; nothing to read yet
    sender = threading.Timer(0.05, client.sendall, args=(b"late",))
    sender.start()
    try:
        the_loop.turn(10)  # returns as soon as the bytes arrive, not after 10 s
    finally:
        sender.join()
    assert reading.received == b"late"


def test_a_touched_dispatcher_is_asked_again_on_the_next_turn_and_an_untouched_one_is_not(loop):
    the_loop, socket_map, peers = loop
    quiet, _ = connect(Connection, socket_map, peers)
    touched, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # the first turn asks everyone
    asked_before = quiet.asked
    quiet.want_write = touched.want_write = True  # an answer is ready for both
    the_loop.touched(touched)  # ... but only this one's request thread said so
    the_loop.turn(0)
    assert touched.writes == 1
    for _ in range(5):
        the_loop.turn(0)
    # The loop did not ask the quiet one again: poll2 would have, and written, on the first turn.
    assert quiet.writes == 0 and quiet.asked == asked_before
    assert touched.writes == 1  # handle_write said it is done; it is not written to again


def test_a_change_made_without_a_wake_up_is_picked_up_by_the_sweep(loop):
    the_loop, socket_map, peers = loop
    quiet, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)
    quiet.want_write = True
    the_loop.turn(0)
    assert quiet.writes == 0  # not before the sweep
    the_loop.sweep_soon()  # what the server's maintenance does
    the_loop.turn(0)
    assert quiet.writes == 1


def test_the_periodic_sweep_asks_everyone_again_after_sweep_s(loop, monkeypatch):
    the_loop, socket_map, peers = loop
    monkeypatch.setattr(event_loop, "SWEEP_S", 0.2)
    quiet, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # a sweep: the next one is due 0.2 s from now
    quiet.want_write = True
    the_loop.turn(0)
    assert quiet.writes == 0  # turns within SWEEP_S of the last sweep do not ask it
    for _ in range(50):  # a generous bound: the sweep is due after 0.2 s
        the_loop.turn(0.05)
        if quiet.writes:
            break
    assert quiet.writes == 1


def test_a_dispatcher_that_stops_reading_gets_no_more_read_events(loop):
    the_loop, socket_map, peers = loop
    connection, client = connect(Connection, socket_map, peers)
    client.sendall(b"one")
    the_loop.turn(0.1)
    connection.want_read = False  # e.g. its request is queued: waitress reads no more until answered
    client.sendall(b"two")
    the_loop.turn(0.1)  # asked again after its event, and unregistered for reading
    reads = connection.reads
    for _ in range(3):
        the_loop.turn(0)
    assert connection.reads == reads and connection.received == b"one"
    connection.want_read = True
    the_loop.touched(connection)
    the_loop.turn(0.1)
    assert connection.received == b"onetwo"


def test_dispatchers_that_are_not_connections_are_asked_on_every_turn(loop):
    the_loop, socket_map, peers = loop
    listener, _ = connect(Other, socket_map, peers)
    connection, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)
    listener_asked, connection_asked = listener.asked, connection.asked
    for _ in range(4):
        the_loop.turn(0)
    assert listener.asked == listener_asked + 4
    assert connection.asked == connection_asked  # a connection is left alone while nothing happens


def test_a_write_wanted_by_a_non_connection_is_seen_on_the_next_turn(loop):
    the_loop, socket_map, peers = loop
    trigger, _ = connect(Other, socket_map, peers, want_read=False)
    the_loop.turn(0)
    trigger.want_write = True  # no touched(): the loop asks it anyway
    the_loop.turn(0)
    assert trigger.writes == 1


def test_a_descriptor_number_reused_after_close_gets_its_own_events(loop):
    the_loop, socket_map, peers = loop
    old, _ = connect(Connection, socket_map, peers, want_write=True)
    the_loop.turn(0)
    old.want_write = True
    the_loop.touched(old)
    the_loop.turn(0)
    assert old.writes == 2  # registered for writing
    fd = old._fileno
    old.close()  # leaves the map, the descriptor number is free
    # No turn in between: the loop learns of both changes at once.
    new, client = reuse_descriptor(fd, Connection, socket_map, peers)
    client.sendall(b"hello")
    the_loop.turn(0.1)
    the_loop.turn(0)
    assert new.received == b"hello"
    assert new.writes == 0  # the old registration (write) did not stick to the new socket
    assert old.writes == 2


def test_a_descriptor_reused_after_a_turn_in_between_gets_its_own_events(loop):
    the_loop, socket_map, peers = loop
    old, _ = connect(Connection, socket_map, peers, want_write=True)
    the_loop.turn(0)
    fd = old._fileno
    old.close()
    the_loop.turn(0)  # forgets the closed descriptor
    new, client = reuse_descriptor(fd, Connection, socket_map, peers)
    client.sendall(b"hello")
    the_loop.turn(0.1)
    assert new.received == b"hello" and new.writes == 0


def test_a_closed_socket_whose_file_another_descriptor_still_holds_leaves_no_stale_events(loop):
    """epoll drops a closed descriptor from its set only once every descriptor of the same open
    file is closed (epoll(7)): a dup, or a child forked meanwhile, keeps the entry alive, and it
    would report the old socket's events under a number that now belongs to another connection
    (waitress closes a connection whose read fails with EAGAIN)."""
    the_loop, socket_map, peers = loop
    old, old_client = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # registered for reading
    fd = old._fileno
    held = os.dup(fd)  # as a child process forked just now would hold it
    try:
        old.close()
        new, _ = reuse_descriptor(fd, Connection, socket_map, peers)
        old_client.sendall(b"for the old socket")  # readable, through the held descriptor
        for _ in range(3):
            the_loop.turn(0.05)  # handle_error re-raises the EAGAIN of a spurious read
        assert new.reads == 0 and new.received == b""
    finally:
        os.close(held)


def reuse_descriptor(fd: int, kind, socket_map: WatchedMap, peers: list):
    """A new dispatcher on a socket whose descriptor number is `fd` (the lowest free number is
    handed out first, so one of a new pair takes it)."""
    first, second = socket.socketpair()
    if second.fileno() == fd:
        first, second = second, first
    assert first.fileno() == fd, "the kernel did not reuse the freed descriptor number"
    peers.append(second)
    return kind(first, socket_map), second


def test_a_socket_closed_under_the_loop_before_it_was_registered_is_closed_like_pollnval(loop):
    the_loop, socket_map, peers = loop
    doomed, _ = connect(Connection, socket_map, peers)
    fd = doomed._fileno
    doomed.socket.close()  # closed behind the dispatcher's back: still in the map
    the_loop.turn(0)
    assert doomed.closes == 1 and fd not in socket_map


def test_a_socket_closed_under_the_loop_after_it_was_registered_is_closed_once_its_wants_change(loop):
    the_loop, socket_map, peers = loop
    doomed, _ = connect(Connection, socket_map, peers)
    survivor, client = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # registered for reading
    fd = doomed._fileno
    doomed.socket.close()  # the kernel drops it from the epoll set by itself
    the_loop.sweep_soon()
    the_loop.turn(0)  # its wants are unchanged, so epoll is not consulted about it: no crash
    client.sendall(b"still here")
    the_loop.turn(0.1)
    assert survivor.received == b"still here"
    # waitress's idle timeout sets will_close, which makes a channel writable(); the
    # maintenance asks for a sweep. The changed registration fails: poll2's POLLNVAL, a close.
    doomed.want_write = True
    the_loop.sweep_soon()
    the_loop.turn(0)
    assert doomed.closes == 1 and fd not in socket_map


def test_watched_map_records_every_descriptor_set_or_deleted():
    socket_map = WatchedMap()
    socket_map[5] = "a"
    socket_map[7] = "b"
    socket_map[5] = "c"  # replaced: the descriptor number may now be another socket
    assert socket_map.changed == {5, 7} and socket_map == {5: "c", 7: "b"}
    socket_map.changed = set()
    deleted = []
    socket_map.on_delete = deleted.append  # the loop unregisters here, before the close
    del socket_map[7]
    assert socket_map.changed == {7} and socket_map == {5: "c"} and deleted == [7]


def test_the_loop_consumes_the_map_changes_it_saw(loop):
    the_loop, socket_map, peers = loop
    connect(Connection, socket_map, peers)
    assert socket_map.changed
    the_loop.turn(0)
    assert socket_map.changed == set()


def test_a_touched_dispatcher_closed_before_the_turn_is_skipped(loop):
    the_loop, socket_map, peers = loop
    gone, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)
    the_loop.touched(gone)
    gone.close()  # _fileno is None now
    the_loop.turn(0)
    assert gone.reads == gone.writes == 0 and not socket_map


def test_a_connection_closed_after_the_loop_closed_closes_quietly(loop):
    the_loop, socket_map, peers = loop
    late, _ = connect(Connection, socket_map, peers)
    the_loop.turn(0)  # registered in epoll
    the_loop.close()  # run_server's finally; a request thread may still close its connection
    late.close()
    assert not socket_map


# --- end to end: the hardened server's loop serving many keep-alive clients ---------------------

def test_server_answers_many_keep_alive_clients_through_the_event_loop(monkeypatch):
    from flask import Flask, request

    from keras_serve.web.server import ServerSettings, build_server, run_server
    from keras_serve.tools.ports import free_ports

    app = Flask("echo")

    @app.get("/echo/<int:number>")
    def echo(number: int):
        return {"number": number, "double": number * 2, "port": request.environ["REMOTE_PORT"]}

    # No periodic sweep: an answer is written only because its request thread named the
    # connection when it woke the loop (touched). Without that it would wait for the server's
    # maintenance pass (every 7 s with these settings), past the clients' 5 s timeout.
    monkeypatch.setattr(event_loop, "SWEEP_S", 3600.0)
    port = free_ports(1)[0]
    server = build_server(app, ServerSettings(host="127.0.0.1", port=port, threads=4, max_body_bytes=1 << 20,
                                              connection_limit=200, idle_timeout_s=30, header_timeout_s=30,
                                              shutdown_grace_s=2))
    clients, requests_each = 50, 4
    answers: dict[int, list] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def client(index: int) -> None:
        try:
            with requests.Session() as session:  # one keep-alive connection per client
                answers[index] = [session.get(f"http://127.0.0.1:{port}/echo/{index * 100 + n}", timeout=5).json()
                                  for n in range(requests_each)]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def run_clients() -> None:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        done.set()
        server.pull_trigger()  # wake the loop to see stopping(), as a signal would

    driver = threading.Thread(target=run_clients, daemon=True)
    driver.start()
    # run_server installs a signal wake-up descriptor, which only the main thread may do.
    unanswered = run_server(server, stopping=done.is_set)
    driver.join(5)
    assert not errors, errors[:3]
    assert unanswered == 0
    assert {i: [(a["number"], a["double"]) for a in answers[i]] for i in answers} == {
        i: [(i * 100 + n, (i * 100 + n) * 2) for n in range(requests_each)] for i in range(clients)}
    assert all(len({a["port"] for a in answers[i]}) == 1 for i in answers)  # each kept its connection
