"""A real nginx in front of several server processes, for the multi-replica tests."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from component_binaries import nginx_binary
from server_process import free_port, stop_process, wait_for_port

CONFIG = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 20m;
    upstream replicas {{
        {servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # The client's address, appended to whatever the client claimed: a server started
            # with --trusted-proxies 1 reads the rightmost entry, which only nginx writes.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # The scheme the client used: a TLS-terminating nginx says https here.
            proxy_set_header X-Forwarded-Proto {scheme};
            # A replica that refuses the connection (it is down) costs the client nothing:
            # nginx tries the next one. A request already sent to a replica that then dies is
            # not replayed (POST is not idempotent): that client gets a 502 and may retry.
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def running_nginx(upstream_ports: list[int], scheme: str = "$scheme") -> Iterator[str]:
    """nginx on a free port balancing over 127.0.0.1:<each port>; yields its base URL.

    `scheme`: what nginx puts in X-Forwarded-Proto; "https" stands for an nginx that ends TLS
    (the tests speak plain HTTP to it). nginx listens on 127.0.0.1, and a client may connect
    from any 127.x.y.z address (bind its socket there): nginx then sees, and forwards, that
    address, so several clients on one machine are several clients to the server."""
    nginx = nginx_binary()
    workdir = Path(tempfile.mkdtemp(prefix="nginx-"))
    workdir.chmod(0o755)  # run as root, nginx's workers are `nobody`: they must reach the body temp files
    port = free_port()
    servers = "\n        ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstream_ports)
    (workdir / "nginx.conf").write_text(CONFIG.format(dir=workdir, port=port, servers=servers, scheme=scheme))
    proc = subprocess.Popen([str(nginx), "-c", str(workdir / "nginx.conf"), "-p", str(workdir),
                             "-e", str(workdir / "error.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)
