"""One image to POST /file/ and its answer back, over `requests`, with retries where the server asks."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import requests

TOKEN_ENV = "KERAS_SERVE_API_TOKEN"
# Waits the server asks for (Retry-After) are honoured up to this; a longer one is an error now.
LONGEST_RETRY_WAIT_S = 30.0
RETRIED_STATUSES = frozenset({429, 503})


class ClientError(Exception):
    """The server refused the image, or could not be reached (status 0, code connection_error)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def classify_url(url: str) -> str:
    """`http://host:8080`, `.../file` or `.../file/` -> `http://host:8080/file/`."""
    base = url.rstrip("/")
    if base.endswith("/file"):
        base = base[: -len("/file")]
    return base + "/file/"


def _error_from(response: requests.Response) -> ClientError:
    try:
        error = response.json()["error"]
        return ClientError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):  # not the server's error body (a proxy's page, say)
        return ClientError(response.status_code, "http_error", f"HTTP {response.status_code} {response.reason}")


def _retry_after(response: requests.Response, attempt: int) -> float:
    """The server's Retry-After (seconds), else a short backoff."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return min(0.5 * 2 ** attempt, LONGEST_RETRY_WAIT_S)


class Client:
    """POST images to one server. Safe to share between threads (a session per thread)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, retries: int = 3) -> None:
        self.url = classify_url(url)
        # Never a command-line flag (it would show in `ps` and shell history): the argument or the environment.
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self.retries = retries
        self._local = threading.local()

    def __repr__(self) -> str:  # no token in a traceback or a log line
        return f"Client({self.url!r}, token={'set' if self._token else 'none'})"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Accept"] = "application/json"
            if self._token:
                session.headers["Authorization"] = f"Bearer {self._token}"
        return session

    def classify(self, image: str | Path | bytes, filename: str | None = None) -> dict[str, Any]:
        """The server's answer for one image (a path, or bytes with an optional file name).
        Raises ClientError for a refusal, or when the server cannot be reached."""
        if isinstance(image, (str, Path)):
            data, filename = Path(image).read_bytes(), filename or Path(image).name
        else:
            data, filename = image, filename or "image"
        attempt = 0
        while True:
            try:
                response = self._session().post(self.url, files={"file": (filename, data)}, timeout=self.timeout_s)
            except requests.RequestException as exc:
                raise ClientError(0, "connection_error", f"{type(exc).__name__}: {exc}") from None
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise ClientError(200, "not_json", "The server's answer is not JSON.") from None
            wait = _retry_after(response, attempt)
            if response.status_code not in RETRIED_STATUSES or attempt >= self.retries or wait > LONGEST_RETRY_WAIT_S:
                raise _error_from(response)
            attempt += 1
            time.sleep(wait)
