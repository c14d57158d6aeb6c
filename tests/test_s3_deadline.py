"""A silent S3 (it accepts connections and never answers) costs an upload at most
STORE_TIMEOUT_S x STORE_ATTEMPTS plus botocore's backoff between tries: exactly STORE_ATTEMPTS
requests, each given up after its read timeout, with no extra wait for a "100 Continue".

The silent store is a listening socket that never reads: the kernel completes every
connection (as for a frozen process), nothing ever answers.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from keras_serve.errors import StorageError
from keras_serve.storage.faults import StoreTimeouts
from keras_serve.storage.images import S3ImageStore

TIMEOUT_S = 0.5
ATTEMPTS = 2


class SilentServer:
    """Accepts connections and keeps them open without a byte of answer; counts the requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(conn)
            conn.settimeout(5)
            try:
                self.heads.append(conn.recv(65536))  # the request as sent; never answered
            except OSError:
                self.heads.append(b"")

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            conn.close()


@pytest.fixture()
def silent_s3(monkeypatch):
    server = SilentServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield server
    server.close()


@pytest.mark.parametrize("call", ["put", "get", "check"])
def test_a_silent_s3_gets_store_attempts_tries_and_answers_within_timeout_times_attempts(silent_s3, call):
    store = S3ImageStore("s3://bucket/uploads", StoreTimeouts(connect_s=1.0, timeout_s=TIMEOUT_S, attempts=ATTEMPTS))
    action = {"put": lambda: store.put("2026/01/01/" + "a" * 32 + ".png", b"x" * 2000, "image/png"),
              "get": lambda: store.get("2026/01/01/" + "a" * 32 + ".png"),
              "check": lambda: store.check()}[call]
    with pytest.raises(StorageError):
        action()
    # The last try's bytes may still be on their way to the counting thread: wait for them, not a fixed time.
    deadline = time.monotonic() + 10
    while len(silent_s3.heads) < ATTEMPTS and time.monotonic() < deadline:
        time.sleep(0.02)
    # Each try waits at most STORE_TIMEOUT_S, so the answer's bound (the tries' timeouts plus backoff under a
    # second; docs/storage-faults.md) follows from the count: botocore's max_attempts meant retries, 3 tries.
    assert len(silent_s3.heads) == ATTEMPTS, silent_s3.heads
    assert not any(b"100-continue" in head.lower() for head in silent_s3.heads)  # no second wait per try
