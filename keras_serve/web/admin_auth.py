"""Who may review: one admin token, sent by programs as a Bearer header or typed once by a
person into the login form, who then holds a session cookie.

- The token comes from ADMIN_TOKEN (environment) or ADMIN_TOKEN_FILE (a mounted secret).
  Without one, review is off and `enabled` is False (the routes answer 404).
- Tokens are compared as SHA-256 digests with `hmac.compare_digest`: constant time, and the
  length of the real token does not show either. The token is never logged, never put in a
  response, and not a metric label.
- The session cookie is Flask's signed cookie, signed with a key derived from the token (so
  every worker and replica agrees, and changing the token logs everyone out), HttpOnly,
  SameSite=Strict, Secure whenever the request came over TLS (directly, or as a trusted
  proxy's X-Forwarded-Proto says: keras_serve.web.proxies).
- The cookie names a session kept in the records database (keras_serve.storage.admin_sessions),
  checked on every request: logging out ends it for good (a copy of the cookie replayed later
  is refused by every process), so does a server started with another admin token, and it
  expires after ADMIN_SESSION_HOURS in any case.
- A state-changing request authenticated by that cookie must carry Flask-WTF's CSRF token
  (form field `csrf_token` or header `X-CSRFToken`) and, when the browser sends an Origin,
  come from this origin. A Bearer request carries no cookie, so it needs no CSRF token.
- Failed attempts are slowed down per client address (normalised as for the rate limit: an
  IPv6 client per /64): after FREE_FAILURES in a row, each next attempt must wait twice as
  long as the last (up to MAX_DELAY_S), answered 429 with Retry-After, without holding a
  request thread asleep.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from flask import Flask, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect

from keras_serve.errors import NotAuthorizedError, StorageError, TooManyAttemptsError
from keras_serve.storage.admin_sessions import AdminSessions
from keras_serve.web.proxies import client_address

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
FREE_FAILURES = 5
MAX_DELAY_S = 60.0
REVIEWER_NAME = re.compile(r"[\w .@+-]{1,64}")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def admin_token(config: Mapping[str, Any]) -> str | None:
    """ADMIN_TOKEN, else the contents of ADMIN_TOKEN_FILE, else None. Raises ValueError on a bad one."""
    token = config.get("ADMIN_TOKEN")
    if not token and config.get("ADMIN_TOKEN_FILE"):
        path = Path(config["ADMIN_TOKEN_FILE"])
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"ADMIN_TOKEN_FILE {path}: cannot read it ({exc})") from None
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable():
        raise ValueError(f"the admin token must be at least {MIN_TOKEN_LENGTH} printable characters "
                         "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class LoginThrottle:
    """Per-client backoff after repeated failures; bounded in memory (the oldest clients are forgotten)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, capacity: int = 10_000) -> None:
        self.clock = clock
        self.capacity = capacity
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failures, blocked until)

    def check(self, client: str) -> None:
        with self._lock:
            failures, until = self._clients.get(client, (0, 0.0))
        wait = until - self.clock()
        if wait > 0:
            error = TooManyAttemptsError(f"Too many failed attempts from this address; try again in "
                                         f"{math.ceil(wait)} s.")
            error.retry_after_s = math.ceil(wait)
            raise error

    def failed(self, client: str) -> None:
        with self._lock:
            failures = self._clients.pop(client, (0, 0.0))[0] + 1
            delay = min(2.0 ** (failures - FREE_FAILURES), MAX_DELAY_S) if failures >= FREE_FAILURES else 0.0
            self._clients[client] = (failures, self.clock() + delay)
            while len(self._clients) > self.capacity:
                self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class ReviewSessions(SecureCookieSessionInterface):
    """Flask's signed cookie, Secure whenever this request came over TLS: the scheme is the
    connection's, or a trusted proxy's X-Forwarded-Proto (keras_serve.web.proxies), never
    what a client says about itself."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure


class AdminAuth:
    def __init__(self, token: str, throttle: LoginThrottle | None = None) -> None:
        self._digest = _digest(token)
        self.throttle = throttle or LoginThrottle()
        self.csrf = CSRFProtect()
        self.sessions: AdminSessions | None = None  # set by init_app

    def matches(self, given: str) -> bool:
        return hmac.compare_digest(_digest(given), self._digest)

    def init_app(self, app: Flask, token: str, session_hours: float) -> None:
        # Derived, not the token itself: the cookie's signature must not be a way to test guesses offline
        # any faster than the token's own strength allows, and the token never leaves in any form.
        app.secret_key = hmac.new(token.encode(), b"keras-serve review session", hashlib.sha256).hexdigest()
        app.session_interface = ReviewSessions()
        app.config.update(
            SESSION_COOKIE_NAME="keras_serve_review", SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Strict", PERMANENT_SESSION_LIFETIME=timedelta(hours=session_hours),
            WTF_CSRF_CHECK_DEFAULT=False,  # checked below, only for cookie-authenticated requests
            WTF_CSRF_SSL_STRICT=False,     # it wants a Referer, which our Referrer-Policy withholds; Origin is checked
            WTF_CSRF_TIME_LIMIT=None,      # the token lives as long as the session that holds it
        )
        self.csrf.init_app(app)
        # Which token a session was made under: keyed by the token, so the database never holds it.
        token_key = hmac.new(token.encode(), b"keras-serve admin session owner", hashlib.sha256).hexdigest()[:32]
        self.sessions = AdminSessions(app.extensions["review_store"].records, token_key,
                                      timedelta(hours=session_hours))
        try:
            ended = self.sessions.end_other_tokens()
        except StorageError:  # the database is down at start: each request still checks the token
            log.warning("could not end the sessions of an earlier admin token now; they are refused anyway")
        else:
            if ended:
                log.info("admin token changed: %d session(s) made under the old one ended", ended)
        app.extensions["admin_auth"] = self

    def client(self) -> str:
        return client_address()

    def authenticate(self) -> str | None:
        """The reviewer's name, or None when the request has no credential at all.

        Raises NotAuthorizedError for a wrong token, TooManyAttemptsError while backing off,
        and Flask-WTF's CSRFError (400) for a cookie-authenticated change without its token.
        """
        header = request.headers.get("Authorization")
        if header is not None:
            client = self.client()
            self.throttle.check(client)
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not self.matches(given.strip()):
                self.throttle.failed(client)
                raise NotAuthorizedError("The admin token is wrong.")
            self.throttle.succeeded(client)
            return reviewer_name(request.headers.get("X-Reviewer"), "api")
        if "reviewer" not in session:
            return None
        reviewer = self.sessions.reviewer(session.get("sid"))
        if reviewer is None:  # logged out, expired, or made under another token
            session.clear()   # and the browser is told to forget the cookie
            return None
        if request.method not in SAFE_METHODS:
            self.check_same_origin()
            self.csrf.protect()
        return reviewer

    def log_in(self, given: str, name: str | None) -> bool:
        """The login form: True (and a fresh session) if the token is right."""
        client = self.client()
        self.throttle.check(client)
        if not self.matches(given):
            self.throttle.failed(client)
            return False
        self.throttle.succeeded(client)
        self.sessions.end(session.get("sid"))  # a login over a live session replaces it
        session.clear()  # a new session for the new login: nothing carried over from before it
        reviewer = reviewer_name(name, "reviewer")
        session["sid"] = self.sessions.start(reviewer)
        session["reviewer"] = reviewer
        session.permanent = True
        return True

    def log_out(self) -> None:
        """End this browser's session everywhere, not only in this browser."""
        self.sessions.end(session.get("sid"))
        session.clear()

    @staticmethod
    def check_same_origin() -> None:
        if not same_origin():
            raise NotAuthorizedError("This request came from another site.")


def same_origin() -> bool:
    """False when the browser says the request comes from another site (Sec-Fetch-Site, Origin).

    Our pages send `Referrer-Policy: no-referrer`, with which Chromium posts forms with
    `Origin: null`; Sec-Fetch-Site (sent by every current browser) still says same-origin then.
    A request with neither header is not from a browser's page (curl, a script): no CSRF risk.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None or (origin == "null" and site is not None):
        return True
    # The host only: behind a TLS proxy the browser's https origin reaches us as plain http.
    return urlsplit(origin).netloc == request.host


def reviewer_name(text: str | None, default: str) -> str:
    text = (text or "").strip()
    return text if REVIEWER_NAME.fullmatch(text) else default
