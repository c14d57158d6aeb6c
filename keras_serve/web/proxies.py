"""Who the client is: its address and scheme, from the connection or from trusted proxies.

The one place that reads X-Forwarded-For and X-Forwarded-Proto (TRUSTED_PROXIES):

- 0 (the default): the connection alone. Every forwarded header is removed from the request
  before the app sees it, so nothing downstream can read one by mistake: a client that sends
  `X-Forwarded-For: 1.2.3.4` or `X-Forwarded-Proto: https` is still itself, over plain HTTP.
- N > 0: werkzeug's ProxyFix with x_for=N and x_proto=N. The client address is the Nth entry
  of X-Forwarded-For from the right (the one the outermost trusted proxy appended; what the
  client itself claimed sits further left and is ignored), and the scheme likewise from
  X-Forwarded-Proto. Host, port and prefix are never taken from headers.

It is WSGI middleware around the Flask app, so it holds whatever serves the app (waitress
with one process or gunicorn's workers, or another server): the HTTP server must pass the
headers through untouched (keras_serve.web.server tells waitress not to strip them).

`client_address()` is the key every per-client count uses (rate limit, admin login backoff,
feedback quota): the address, or its /64 for IPv6, since one host usually holds a whole /64.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from flask import request
from werkzeug.middleware.proxy_fix import ProxyFix

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Every header through which a proxy (or a client pretending to be one) names the client,
# as WSGI environ keys.
FORWARDED_KEYS = frozenset({"HTTP_FORWARDED", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO",
                            "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX",
                            "HTTP_X_REAL_IP"})


class IgnoreForwardedHeaders:
    """No trusted proxy: drop what a client claims about its address or scheme."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        for key in FORWARDED_KEYS & environ.keys():
            del environ[key]
        return self.app(environ, start_response)


def trust_proxies(app: WsgiApp, trusted_proxies: int) -> WsgiApp:
    """`app` wrapped so that the client's address and scheme come from the connection (0) or
    from the headers the `trusted_proxies` proxies in front appended."""
    if trusted_proxies <= 0:
        return IgnoreForwardedHeaders(app)
    return ProxyFix(app, x_for=trusted_proxies, x_proto=trusted_proxies, x_host=0, x_port=0, x_prefix=0)


def normalised_address(address: str | None) -> str:
    """The key a per-client count uses: an IPv4 address as is (also when IPv4-mapped), an
    IPv6 address as its /64; anything else (a Unix socket's empty name) as given."""
    address = address or "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:1.2.3.4 is the IPv4 client 1.2.3.4
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address() -> str:
    """This request's client, normalised (see `normalised_address`)."""
    return normalised_address(request.remote_addr)
