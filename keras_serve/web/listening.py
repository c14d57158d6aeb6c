"""The server's listening socket, bound before anything slow happens.

Apart from `keras_serve.web.server` so that binding imports only waitress's address
resolution: `python app.py` on a port in use fails before it imports Flask's app, the store
or the model, and within a fraction of a second.
"""
from __future__ import annotations

import socket

from waitress.adjustments import Adjustments

LISTEN_BACKLOG = 2048


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, as waitress would make it (the same address
    resolution, SO_REUSEADDR). Bound before the model loads, so that a port in use fails the
    start at once instead of after the load. Raises OSError, or ValueError for a bad host or port."""
    if not 0 <= port <= 65535:  # the resolver would silently take it modulo 65536
        raise ValueError(f"port {port} is not between 0 and 65535")
    try:
        family, socktype, proto, address = Adjustments(host=host, port=port).listen[0]
    except ValueError:  # waitress says only "Invalid host/port specified."
        raise ValueError(f"{host} is not a host name or address of this machine") from None
    sock = socket.socket(family, socktype, proto)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
