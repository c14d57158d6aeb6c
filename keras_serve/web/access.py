"""Access control for programs: API tokens and rate limits on POST /file/ and on heatmaps
(the endpoints that run the model), off by default.

- API tokens (API_TOKENS, API_TOKENS_FILE): set, `POST /file/` (and `/file`) and
  `GET /uploads/<id>/heatmap.png` need
  `Authorization: Bearer <token>`; without a valid one the answer is 401 with
  `WWW-Authenticate: Bearer`. The browser form cannot send a header, so with tokens on the
  page says a token is needed, unless ALLOW_ANONYMOUS_UPLOADS accepts uploads without one
  (from the form or from anything else: a server cannot tell a browser from a script).
  A presented token is compared in constant time with every configured token (SHA-256
  digests through `hmac.compare_digest`, no early exit), and is never logged, stored or put
  in /metrics: a token is known to the rest of the app only as the first 16 hex digits of
  its SHA-256 (`token:<hex>`), which is the rate-limit key.
- Rate limits (RATE_LIMIT, flask-limiter): per API token, or per client address for a
  request without a valid one (an IPv6 client per /64, what one host usually gets). Counts
  live in RATE_LIMIT_STORAGE_URI: `memory://` in each process, `redis://` shared by every
  process and replica. The limit is checked before the token, so guessing tokens is limited
  per address too. Over the limit: 429 with `Retry-After`. If Redis cannot be reached, each
  process counts in memory until it can again (logged), rather than refusing uploads.
- Client address (TRUSTED_PROXIES): the connection's address; X-Forwarded-For counts only
  behind that many proxies, read from the right (werkzeug's ProxyFix, applied in
  keras_serve.web.proxies), so a client cannot pick its own address by sending the header.

Health, readiness, metrics, the pages, stored images and static files are neither guarded
nor limited: only the endpoints that spend the model's time and storage are.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from flask import Flask, g, request

from keras_serve.errors import ConfigurationError, InvalidTokenError, MissingTokenError, RateLimitedError
from keras_serve.web import bounded_memory
from keras_serve.web.proxies import client_address, trust_proxies

log = logging.getLogger(__name__)

# POST /file/ and POST /file, and the heatmap: each runs the model, so each needs a token and
# counts against the limit (the heatmap with a count of its own, of the same size).
GUARDED_ENDPOINTS = frozenset({"web.classify", "web.upload_heatmap"})
# RFC 6750's b64token: what can follow "Bearer " without quoting.
TOKEN_SYNTAX = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_CHARS = 16
RATE_LIMIT_STRATEGY = "sliding-window-counter"  # one counter pair per key, no burst at a window's edge
REDIS_TIMEOUT_S = 1.0  # a Redis that hangs costs an upload this much, then memory counting takes over
KEY_PREFIX = "keras-serve"
# memory://: at most this many counters per process (about 27 MB); see bounded_memory.
MEMORY_MAX_KEYS = bounded_memory.DEFAULT_MAX_KEYS


@dataclass(frozen=True)
class AccessSettings:
    inline_tokens: tuple[str, ...] = field(repr=False)  # never in a log line or traceback
    tokens_file: Path | None
    allow_anonymous_uploads: bool
    rate_limit: str | None
    rate_limit_storage_uri: str
    trusted_proxies: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AccessSettings":
        """Checked at start-up: raises ConfigurationError naming the setting (never a token)."""
        given = config.get("API_TOKENS") or ()
        inline = tuple(t.strip() for t in (given.split(",") if isinstance(given, str) else given) if t.strip())
        for position, token in enumerate(inline, 1):
            check_token_syntax(token, f"API_TOKENS, token {position}")
        tokens_file = Path(config["API_TOKENS_FILE"]) if config.get("API_TOKENS_FILE") else None
        if tokens_file is not None:
            read_tokens_file(tokens_file)  # unreadable, empty or malformed: refuse to start
        rate_limit = (config.get("RATE_LIMIT") or "").strip() or None
        if rate_limit is not None:
            from limits import parse_many

            try:
                parse_many(rate_limit)
            except ValueError:
                raise ConfigurationError(f"RATE_LIMIT {rate_limit!r} is not a rate limit",
                                         "Write it as 60/minute, 1000/day or several joined by ';'.") from None
        storage = str(config.get("RATE_LIMIT_STORAGE_URI") or "memory://")
        if urlsplit(storage).scheme not in ("memory", "redis", "rediss", "redis+unix", "redis+sentinel",
                                            "redis+cluster", "valkey", "valkeys"):
            raise ConfigurationError(f"RATE_LIMIT_STORAGE_URI must be memory:// or redis://host:port/db, "
                                     f"not {redacted_uri(storage)}")
        try:
            proxies = int(config.get("TRUSTED_PROXIES") or 0)
        except (TypeError, ValueError):
            raise ConfigurationError("TRUSTED_PROXIES must be a whole number of proxies") from None
        if proxies < 0:
            raise ConfigurationError("TRUSTED_PROXIES must be 0 or more")
        return cls(inline, tokens_file, bool(config.get("ALLOW_ANONYMOUS_UPLOADS")), rate_limit, storage, proxies)

    @property
    def tokens_on(self) -> bool:
        return bool(self.inline_tokens) or self.tokens_file is not None


def check_token_syntax(token: str, where: str) -> None:
    if not TOKEN_SYNTAX.fullmatch(token):
        raise ConfigurationError(f"{where}: a token may hold only letters, digits and - . _ ~ + / (then =)",
                                 "Make tokens with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters",
                                 "Make tokens with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")


def read_tokens_file(path: Path) -> tuple[str, ...]:
    """One token per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"API_TOKENS_FILE {path} cannot be read: {getattr(exc, 'strerror', None) or exc}",
                                 "Give the server's user read access to the file.") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            check_token_syntax(line, f"API_TOKENS_FILE {path}, line {number}")
            tokens.append(line)
    if not tokens:
        raise ConfigurationError(f"API_TOKENS_FILE {path} holds no token",
                                 "Write one token per line, or unset API_TOKENS_FILE to turn tokens off.")
    return tuple(tokens)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class ApiTokens:
    """The accepted tokens, as SHA-256 digests; the file is read again when it changes.

    A file that turns unreadable or malformed while serving leaves the tokens read last in
    force (logged): a half-written secret must not lock every client out, nor let one in.
    """

    def __init__(self, inline: tuple[str, ...], path: Path | None) -> None:
        self._inline = tuple(digest(t) for t in inline)
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: tuple[bytes, ...] = ()
        if path is not None:
            self._stamp = self._file_stamp()
            self._from_file = tuple(digest(t) for t in read_tokens_file(path))

    def __len__(self) -> int:
        return len(self._all())

    def _all(self) -> tuple[bytes, ...]:
        return self._inline + self._from_file

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)  # follows the symlink a Kubernetes secret volume swaps
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._from_file = tuple(digest(t) for t in read_tokens_file(self._path))
                log.info("API_TOKENS_FILE changed: %d token(s) in force", len(self._all()))
            except ConfigurationError as exc:
                log.error("API_TOKENS_FILE changed but is not usable (%s); the tokens read before stay in force",
                          exc.message)

    def identify(self, presented: str) -> str | None:
        """`token:<16 hex>` for an accepted token, else None; the same work for any input."""
        self._reload_if_changed()
        wanted = digest(presented)
        found = None
        for known in self._all():  # no early exit: the time says nothing about which token matched
            if hmac.compare_digest(wanted, known):
                found = known
        return None if found is None else "token:" + found.hex()[:16]


def redacted_uri(uri: str) -> str:
    """scheme://host:port, without a password or path, for logs and messages."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


class AccessControl:
    """The app's tokens and limiter; `app.extensions["access"]`."""

    def __init__(self, settings: AccessSettings) -> None:
        self.settings = settings
        self.tokens = ApiTokens(settings.inline_tokens, settings.tokens_file) if settings.tokens_on else None
        self.limiter = None

    @property
    def form_needs_token(self) -> bool:
        return self.tokens is not None and not self.settings.allow_anonymous_uploads

    def token_identity(self) -> str | None:
        """The request's token identity (`token:<hex>`), None without a valid one; once per request."""
        if "access_identity" not in g:
            header = request.headers.get("Authorization")
            g.access_presented = header is not None
            identity = None
            if header is not None and self.tokens is not None:
                scheme, _, credentials = header.strip().partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    identity = self.tokens.identify(credentials.strip())
            g.access_identity = identity
        return g.access_identity

    def rate_limit_key(self) -> str:
        return self.token_identity() or "address:" + client_address()

    def require_token(self) -> None:
        if request.endpoint not in GUARDED_ENDPOINTS:
            return
        if self.token_identity() is not None:
            return
        if not g.access_presented:
            if self.settings.allow_anonymous_uploads:
                return
            raise MissingTokenError("This server needs an API token to classify an image."
                                    if request.endpoint == "web.classify" else
                                    "This server needs an API token to draw a heatmap.")
        # A wrong token is refused even where anonymous uploads are allowed: the client means
        # to use one, and should learn that it does not work.
        raise InvalidTokenError("The API token in the Authorization header is not valid here.")


def init_app(app: Flask) -> AccessControl:
    """Register the guard and the limiter (when configured); call after the metrics hooks, so
    that refused requests are counted and timed like every other."""
    settings = AccessSettings.from_config(app.config)
    access = AccessControl(settings)
    app.extensions["access"] = access

    # The client's address and scheme for everything after this: rate limits, the admin login
    # backoff, the feedback quota, the session cookie's Secure flag (keras_serve.web.proxies).
    app.wsgi_app = trust_proxies(app.wsgi_app, settings.trusted_proxies)

    if settings.rate_limit:
        access.limiter = _limiter(app, access)  # its before_request runs before the token check

    if access.tokens is not None:  # off: nothing runs per request
        app.before_request(access.require_token)

    @app.context_processor
    def access_for_templates() -> dict[str, bool]:
        return {"uploads_need_token": access.form_needs_token, "api_tokens_on": access.tokens is not None}

    parts = []
    if access.tokens is not None:
        parts.append(f"API tokens required for POST /file/ ({len(access.tokens)} accepted"
                     f"{', anonymous uploads allowed' if settings.allow_anonymous_uploads else ''})")
    if settings.rate_limit:
        parts.append(f"rate limit {settings.rate_limit} per token or client address, counted in "
                     f"{redacted_uri(settings.rate_limit_storage_uri)}")
    if settings.trusted_proxies:
        parts.append(f"client address and scheme from X-Forwarded-For and X-Forwarded-Proto behind "
                     f"{settings.trusted_proxies} proxy(ies)")
    if parts:
        log.info("access: %s", "; ".join(parts))
    return access


def _limiter(app: Flask, access: AccessControl):
    from flask_limiter import Limiter
    from flask_limiter.errors import RateLimitExceeded

    settings = access.settings
    storage_uri = settings.rate_limit_storage_uri
    if urlsplit(storage_uri).scheme == "memory":
        # limits' own memory storage has no ceiling; this one keeps at most this many counters.
        storage_uri = f"{bounded_memory.SCHEME}://"
        storage_options: dict[str, Any] = {"max_keys": MEMORY_MAX_KEYS}
    else:
        storage_options = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
    limiter = Limiter(
        key_func=access.rate_limit_key,
        app=app,
        default_limits=[settings.rate_limit],
        default_limits_exempt_when=lambda: request.endpoint not in GUARDED_ENDPOINTS,
        storage_uri=storage_uri,
        storage_options=storage_options,
        strategy=RATE_LIMIT_STRATEGY,
        key_prefix=KEY_PREFIX,
        headers_enabled=False,  # it would put Retry-After on every answer; ours go on the 429 only
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(exc: RateLimitExceeded):
        from keras_serve.web.responses import service_error_response

        retry_after = 1
        try:
            current = limiter.current_limit
            if current is not None:
                retry_after = max(1, math.ceil(current.reset_at - time.time()))
        except Exception:  # the store went away between the count and this answer
            log.warning("could not read the rate-limit window; answering Retry-After: 1", exc_info=True)
        who = "API token" if g.get("access_identity") else "client address"
        return service_error_response(RateLimitedError(
            f"Too many {'heatmaps' if request.endpoint == 'web.upload_heatmap' else 'uploads'}: this server "
            f"allows {exc.limit.limit} per {who}.", retry_after))

    return limiter
