"""API tokens and rate limits over real HTTP: `python app.py` as one process, as two gunicorn
workers (--workers 2), and as two replicas behind nginx, the shared counts in a real redis-server.

How counts combine (docs/access-control.md): with memory:// each process counts alone, so N
processes let N times the limit through; with one Redis every process and replica draws on
the same count.
"""
from __future__ import annotations

import json
import urllib.request

import pytest
import requests
import urllib3

from images import RED, image_bytes
from load_balancer import running_nginx
from server_process import ServerProcess, ready_pids

TOKEN_A = "http-A-0123456789abcdefghijkl"
TOKEN_B = "http-B-0123456789abcdefghijkl"
PNG = image_bytes(RED, (48, 40), "PNG")


def upload(base_url: str, token: str | None = None, headers: dict[str, str] | None = None) -> requests.Response:
    """POST /file/ on a new connection (so the kernel may hand it to any worker)."""
    sent = {"Connection": "close", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return requests.post(base_url + "/file/", files={"file": ("red.png", PNG, "image/png")}, headers=sent,
                         timeout=60)


def images_classified(url: str) -> int:
    with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
        return int(json.load(r)["images"])


@pytest.fixture()
def tokens_file(tmp_path):
    path = tmp_path / "api-tokens"
    path.write_text(f"# test tokens\n{TOKEN_A}\n{TOKEN_B}\n")
    path.chmod(0o600)
    return path


@pytest.fixture()
def start_server(colour_model_path, tmp_path):
    """Start `python app.py` on the colour model with more arguments; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, name: str = "server", env: dict[str, str] | None = None) -> ServerProcess:
        srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / name),
                            "--threads", "8", *args, env=env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def test_one_process_guards_and_limits_uploads_over_http_and_never_prints_a_token(start_server, tokens_file):
    srv = start_server("--api-tokens-file", str(tokens_file), "--rate-limit", "3/hour")
    missing = upload(srv.url)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="keras-serve"'
    assert missing.json()["error"]["code"] == "missing_token"
    wrong = upload(srv.url, "not-" + TOKEN_A)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    answers = [upload(srv.url, TOKEN_A) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].json()["class"] == "DOG"
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 3600
    assert answers[-1].json()["error"]["code"] == "rate_limited"
    assert upload(srv.url, TOKEN_B).status_code == 200  # another token, another count
    for path in ("/healthz", "/readyz", "/metrics", "/static/style.css", "/"):
        assert [requests.get(srv.url + path, timeout=10).status_code for _ in range(5)] == [200] * 5, path
    page = requests.get(srv.url + "/", headers={"Accept": "text/html"}, timeout=10).text
    assert 'id="token-required"' in page and "<form" not in page
    metrics = requests.get(srv.url + "/metrics", timeout=10).text
    output = srv.stop()
    assert "access: API tokens required for POST /file/ (2 accepted)" in output
    assert "rate limit 3/hour per token or client address, counted in memory://" in output
    for token in (TOKEN_A, TOKEN_B):
        assert token not in output and token not in metrics


def test_two_workers_with_memory_storage_each_count_alone(start_server, tokens_file):
    """Documented behaviour, shown: memory:// is per process, so two workers allow twice the limit."""
    srv = start_server("--workers", "2", "--api-tokens-file", str(tokens_file), "--rate-limit", "2/hour")
    assert len(ready_pids(srv.url)) == 2
    statuses = []
    while statuses.count(200) < 4 and len(statuses) < 80:  # until both workers have spent their 2
        statuses.append(upload(srv.url, TOKEN_A).status_code)
    assert statuses.count(200) == 4 and set(statuses) <= {200, 429}, statuses  # twice the limit of 2
    assert {upload(srv.url, TOKEN_A).status_code for _ in range(10)} == {429}
    # said at start-up, once (by the launcher, not by each worker)
    assert srv.output().count("counted in memory:// by each of 2 worker processes") == 1, srv.output()


def test_two_workers_share_one_limit_in_redis_and_keep_limiting_per_process_while_it_is_down(
        start_server, tokens_file, redis_server):
    srv = start_server("--workers", "2", "--api-tokens-file", str(tokens_file), "--rate-limit", "3/hour",
                       "--rate-limit-storage", redis_server.url)
    assert len(ready_pids(srv.url)) == 2  # both workers answer: a single count is not one worker's
    statuses = [upload(srv.url, TOKEN_A).status_code for _ in range(16)]
    assert statuses == [200] * 3 + [429] * 13, statuses
    keys = redis_server.keys()
    assert keys and all("LIMITER/keras-serve/token:" in k for k in keys), keys
    assert not any(TOKEN_A in k or TOKEN_B in k for k in keys)  # the store holds a digest, never a token

    # Redis gone: no upload fails for it; each worker counts in memory (per process) instead.
    redis_server.stop()
    during = [upload(srv.url, TOKEN_A).status_code for _ in range(10)]
    assert set(during) == {200, 429} and 3 <= during.count(200) <= 6, during
    output = srv.stop()
    assert "Rate limit storage unreachable - falling back to in-memory storage" in output
    assert TOKEN_A not in output


def test_two_replicas_behind_nginx_share_one_limit_and_forged_forwarded_for_escapes_nothing(
        start_server, tokens_file, redis_server):
    # Each replica trusts one proxy (nginx): the client address is what nginx appended.
    shared = ("--rate-limit", "4/hour", "--rate-limit-storage", redis_server.url, "--trusted-proxies", "1",
              "--api-tokens-file", str(tokens_file), "--allow-anonymous-uploads")
    a, b = start_server(*shared, name="a"), start_server(*shared, name="b")
    with running_nginx([a.port, b.port]) as balancer:
        # Anonymous: counted per client address, whatever X-Forwarded-For the client invents.
        anonymous = [upload(balancer, headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                     for i in range(10)]
        assert anonymous == [200] * 4 + [429] * 6, anonymous
        assert images_classified(a.url) > 0 and images_classified(b.url) > 0, "nginx should use both replicas"
        # A token has its own count, shared by both replicas as well.
        with_token = [upload(balancer, TOKEN_A).status_code for _ in range(8)]
        assert with_token == [200] * 4 + [429] * 4, with_token
        refused = upload(balancer, TOKEN_A)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert images_classified(a.url) + images_classified(b.url) == 8


# --- behind the real nginx: each client is itself ---------------------------------------------------

ADMIN_TOKEN = "http-admin-0123456789abcdefgh"


def from_address(source: str) -> urllib3.PoolManager:
    """A client whose connections come from `source` (a 127.x.y.z address): nginx sees that address."""
    return urllib3.PoolManager(source_address=(source, 0), retries=False, timeout=60)


def upload_from(pool: urllib3.PoolManager, base_url: str, headers: dict[str, str] | None = None) -> int:
    return pool.request("POST", base_url + "/file/", fields={"file": ("red.png", PNG, "image/png")},
                        headers={"Connection": "close", **(headers or {})}).status


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one process", "two workers"])
def test_behind_nginx_two_clients_have_their_own_rate_limit_and_a_tls_proxy_gets_a_secure_cookie(
        start_server, workers):
    srv = start_server("--trusted-proxies", "1", "--rate-limit", "3/hour", *workers,
                       env={"KERAS_SERVE_ADMIN_TOKEN": ADMIN_TOKEN})
    alice, bob = from_address("127.0.0.2"), from_address("127.0.0.3")
    with running_nginx([srv.port], scheme="https") as balancer:
        # Alice spends her budget (with two workers counting in memory each, up to twice 3)...
        alice_statuses = []
        while 429 not in alice_statuses and len(alice_statuses) < 8:
            alice_statuses.append(upload_from(alice, balancer))
        assert alice_statuses[-1] == 429 and 3 <= alice_statuses.count(200) <= 3 * max(1, len(workers)), alice_statuses
        # ...and Bob, another machine behind the same nginx, still has all of his.
        assert [upload_from(bob, balancer) for _ in range(3)] == [200] * 3
        # nginx says the client came over https: the session cookie is Secure.
        login = alice.request("GET", balancer + "/review/login", headers={"Accept": "text/html"})
        assert login.status == 200
        cookie = login.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie, cookie
    # Straight to the server, over plain http, the cookie is not Secure.
    assert "Secure" not in requests.get(srv.url + "/review/login", headers={"Accept": "text/html"},
                                        timeout=10).headers["Set-Cookie"]


def test_behind_nginx_one_clients_wrong_admin_tokens_and_feedback_spend_nobody_elses(start_server):
    srv = start_server("--trusted-proxies", "1",
                       env={"KERAS_SERVE_ADMIN_TOKEN": ADMIN_TOKEN, "KERAS_SERVE_FEEDBACK_PER_HOUR": "2"})
    alice, bob = from_address("127.0.0.2"), from_address("127.0.0.3")
    with running_nginx([srv.port]) as balancer:
        wrong = [alice.request("GET", balancer + "/api/uploads",
                               headers={"Authorization": "Bearer not-the-admin-token-at-all"}).status
                 for _ in range(5)]
        assert wrong == [401] * 5
        right = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert alice.request("GET", balancer + "/api/uploads", headers=right).status == 429  # Alice waits
        assert bob.request("GET", balancer + "/api/uploads", headers=right).status == 200  # Bob does not

        upload_id = json.loads(alice.request("POST", balancer + "/file/",
                                             fields={"file": ("red.png", PNG, "image/png")}).data)["id"]

        def feedback(pool: urllib3.PoolManager) -> int:
            return pool.request("POST", f"{balancer}/uploads/{upload_id}/feedback", json={"label": "CAT"}).status

        assert [feedback(alice) for _ in range(3)] == [200, 200, 429]
        assert feedback(bob) == 200


def test_without_trusted_proxies_a_direct_clients_forwarded_headers_are_ignored(start_server):
    srv = start_server("--rate-limit", "3/hour", env={"KERAS_SERVE_ADMIN_TOKEN": ADMIN_TOKEN})
    statuses = [upload(srv.url, headers={"X-Forwarded-For": f"198.51.100.{i}", "X-Forwarded-Proto": "https"})
                .status_code for i in range(5)]
    assert statuses == [200] * 3 + [429] * 2, statuses
    login = requests.get(srv.url + "/review/login", timeout=10,
                         headers={"Accept": "text/html", "X-Forwarded-Proto": "https"})
    assert "Secure" not in login.headers["Set-Cookie"]
