"""Access control for programs, through Flask's test client: API tokens and rate limits on POST /file/.

Over real HTTP (one process, two workers, two replicas behind nginx, Redis): test_access_http.py.
"""
from __future__ import annotations

import hmac
import io
import logging
import os
import subprocess
import sys

import pytest

from images import BLUE, RED, image_bytes
from keras_serve.errors import ConfigurationError
from server_process import ROOT

TOKEN_A = "tok-A-0123456789abcdefghij"
TOKEN_B = "tok-B-0123456789abcdefghij"
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_image(client, path: str = "/file/", headers: dict | None = None, address: str = "127.0.0.1"):
    return client.post(path, data={"file": (io.BytesIO(image_bytes(RED)), "red.png")}, headers=headers or {},
                       environ_base={"REMOTE_ADDR": address})


@pytest.fixture()
def access_app(make_app, colour_model_path):
    """An app on the colour model with the given access settings."""
    def make(**config):
        return make_app(MODEL_PATH=str(colour_model_path), **config)
    return make


@pytest.fixture()
def tokens_client(access_app):
    return access_app(API_TOKENS=f"{TOKEN_A}, {TOKEN_B}").test_client()


# --- off by default ------------------------------------------------------------------------------

def test_without_access_settings_anyone_may_upload_and_nothing_is_limited(access_app):
    client = access_app().test_client()
    answers = [post_image(client) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    assert not any("Retry-After" in r.headers or "WWW-Authenticate" in r.headers for r in answers)
    page = client.get("/").get_data(as_text=True)
    assert '<form id="upload-form" action="/file/"' in page and "Authorization" not in page


# --- tokens --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/file", "/file/"])
def test_with_tokens_a_request_without_one_is_401_with_a_bearer_challenge_and_says_what_to_do(
        tokens_client, path):
    r = post_image(tokens_client, path)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="keras-serve"'
    error = r.get_json()["error"]
    assert error["status"] == 401 and error["code"] == "missing_token"
    assert "Authorization: Bearer" in error["hint"]


@pytest.mark.parametrize("path", ["/file", "/file/"])
def test_each_configured_token_is_accepted(tokens_client, path):
    for token in (TOKEN_A, TOKEN_B):
        r = post_image(tokens_client, path, bearer(token))
        assert r.status_code == 200 and r.get_json()["class"] == "DOG"
    # The scheme is case-insensitive (RFC 7235); the token is not.
    assert post_image(tokens_client, path, {"Authorization": f"bearer {TOKEN_A}"}).status_code == 200
    assert post_image(tokens_client, path, bearer(TOKEN_A.upper())).status_code == 401


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN_A}x",                 # one character more
    f"Bearer {TOKEN_A[:-1]}",             # one character less
    "Bearer " + "x" * 10_000,             # long
    "Bearer",                             # no token
    f"Basic {TOKEN_A}",                   # another scheme
    f"Token {TOKEN_A}",
    "Bearer \u00e9\u00e8\u00ea-not-ascii-at-all",
])
def test_a_wrong_or_malformed_token_is_401_invalid_token(tokens_client, header):
    r = post_image(tokens_client, headers={"Authorization": header})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="keras-serve", error="invalid_token"'
    assert r.get_json()["error"]["code"] == "invalid_token"


def test_a_browser_without_a_token_gets_the_error_page_and_the_form_page_says_a_token_is_needed(tokens_client):
    r = post_image(tokens_client, headers=BROWSER)
    assert r.status_code == 401 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "(401)" in page and "Authorization: Bearer" in page
    index = tokens_client.get("/", headers=BROWSER)
    assert index.status_code == 200
    html = index.get_data(as_text=True)
    assert 'id="token-required"' in html and "<form" not in html
    assert "Authorization: Bearer YOUR_TOKEN" in html


def test_with_anonymous_uploads_allowed_the_form_works_without_a_token_but_a_wrong_token_is_refused(access_app):
    client = access_app(API_TOKENS=TOKEN_A, ALLOW_ANONYMOUS_UPLOADS=True).test_client()
    html = client.get("/", headers=BROWSER).get_data(as_text=True)
    assert '<form id="upload-form" action="/file/"' in html and 'id="token-required"' not in html
    assert "Authorization: Bearer YOUR_TOKEN" in html  # programs are told about tokens
    form_post = post_image(client, headers=BROWSER)
    assert form_post.status_code == 200 and "DOG" in form_post.get_data(as_text=True)
    assert post_image(client).status_code == 200
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 200
    assert post_image(client, headers=bearer(TOKEN_B)).status_code == 401


def test_health_readiness_metrics_pages_images_and_static_files_need_no_token(tokens_client):
    upload_id = post_image(tokens_client, headers=bearer(TOKEN_A)).get_json()["id"]
    for path in ("/healthz", "/readyz", "/metrics", "/", "/model", "/static/style.css",
                 f"/uploads/{upload_id}", f"/uploads/{upload_id}/record"):
        assert tokens_client.get(path).status_code == 200, path


def test_tokens_are_compared_in_constant_time_against_every_configured_token(access_app, monkeypatch):
    tokens = [f"token-{i:02d}-0123456789abcdef" for i in range(5)]
    client = access_app(API_TOKENS=",".join(tokens)).test_client()
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    for presented in (tokens[0], tokens[-1], "nothing-like-any-token-at-all", "x" * 5000):
        compared.clear()
        post_image(client, headers=bearer(presented))
        # Every token is compared, also after a match, and always as two 32-byte digests: how
        # long it takes says nothing about which token matched or how long the right one is.
        assert compared == [(32, 32)] * len(tokens), presented


def test_tokens_never_reach_the_logs_or_the_metrics(access_app, caplog):
    client = access_app(API_TOKENS=TOKEN_A, RATE_LIMIT="2/hour").test_client()
    wrong = "wrong-token-0123456789abcdef"
    with caplog.at_level(logging.DEBUG):
        statuses = [post_image(client, headers=bearer(t)).status_code for t in (TOKEN_A, TOKEN_A, TOKEN_A, wrong)]
    assert statuses == [200, 200, 429, 401]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'status="429"' in metrics and 'status="401"' in metrics  # refused requests are counted ...
    for secret in (TOKEN_A, wrong):  # ... but no token appears anywhere
        assert secret not in caplog.text and secret not in metrics


# --- the token file ------------------------------------------------------------------------------

def test_tokens_are_read_from_a_file_with_comments_and_blank_lines(access_app, tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# issued 2026-01\n\n{TOKEN_A}\n  {TOKEN_B}  \n")
    client = access_app(API_TOKENS_FILE=str(path)).test_client()
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 200
    assert post_image(client, headers=bearer(TOKEN_B)).status_code == 200
    assert post_image(client, headers=bearer("# issued 2026-01")).status_code == 401


def test_a_changed_token_file_takes_effect_without_a_restart_and_a_broken_one_keeps_the_old_tokens(
        access_app, tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(TOKEN_A + "\n")
    client = access_app(API_TOKENS_FILE=str(path)).test_client()
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 200
    # Rotation as a Kubernetes secret volume does it: a new file swapped in by rename.
    (tmp_path / "tokens.new").write_text(TOKEN_B + "\n")
    os.replace(tmp_path / "tokens.new", path)
    assert post_image(client, headers=bearer(TOKEN_B)).status_code == 200
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 401  # revoked
    (tmp_path / "tokens.new").write_text("short\n")  # not a usable token: ignored, logged
    os.replace(tmp_path / "tokens.new", path)
    with caplog.at_level(logging.ERROR):
        assert post_image(client, headers=bearer(TOKEN_B)).status_code == 200
    assert "not usable" in caplog.text and TOKEN_B not in caplog.text


@pytest.mark.parametrize("config,says", [
    ({"API_TOKENS": "short"}, "at least 16 characters"),
    ({"API_TOKENS": "has a space in the middle!!"}, "only letters, digits"),
    ({"API_TOKENS_FILE": "/nonexistent/tokens"}, "cannot be read"),
    ({"RATE_LIMIT": "lots per fortnight"}, "is not a rate limit"),
    ({"RATE_LIMIT": "5/minute", "RATE_LIMIT_STORAGE_URI": "mysql://user:secret-password@db/x"}, "mysql://db"),
    ({"TRUSTED_PROXIES": -1}, "0 or more"),
])
def test_unusable_access_settings_stop_the_app_with_a_message_that_reveals_no_secret(make_app, config, says):
    with pytest.raises(ConfigurationError) as info:
        make_app(**config)  # before the model is loaded: no MODEL_PATH needed to see it
    message = info.value.message
    assert says in message and "secret-password" not in message and "has a space" not in message


def test_an_empty_token_file_is_refused_rather_than_taken_for_no_tokens(make_app, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# nothing issued yet\n\n")
    with pytest.raises(ConfigurationError, match="holds no token"):
        make_app(API_TOKENS_FILE=str(path))


def test_the_command_line_prints_one_line_for_an_unusable_setting(tmp_path):
    done = subprocess.run([sys.executable, "app.py", "--rate-limit", "often", "--upload-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_SERVE_API_TOKENS": ""})
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: RATE_LIMIT 'often' is not a rate limit")
    assert "Traceback" not in done.stderr


# --- rate limits ---------------------------------------------------------------------------------

def test_over_the_rate_limit_is_429_with_retry_after_and_the_error_body(access_app):
    client = access_app(RATE_LIMIT="3/hour").test_client()
    answers = [post_image(client) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    refused = answers[-1]
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    error = refused.get_json()["error"]
    assert error["code"] == "rate_limited" and "3 per 1 hour per client address" in error["message"]
    assert refused.headers["Retry-After"] in error["hint"]
    page = post_image(client, headers=BROWSER)
    assert page.status_code == 429 and page.mimetype == "text/html" and "Retry-After" in page.get_data(as_text=True)
    assert "Retry-After" not in answers[0].headers  # only a refusal says when to come back


def test_each_token_has_its_own_limit_and_requests_without_one_share_their_address_limit(access_app):
    client = access_app(API_TOKENS=f"{TOKEN_A},{TOKEN_B}", ALLOW_ANONYMOUS_UPLOADS=True,
                        RATE_LIMIT="2/hour").test_client()
    assert [post_image(client, headers=bearer(TOKEN_A)).status_code for _ in range(3)] == [200, 200, 429]
    assert [post_image(client, headers=bearer(TOKEN_B)).status_code for _ in range(3)] == [200, 200, 429]
    # Token A from another address is still token A: the limit follows the token.
    assert post_image(client, headers=bearer(TOKEN_A), address="10.0.0.9").status_code == 429
    refused = post_image(client, headers=bearer(TOKEN_A))
    assert "per API token" in refused.get_json()["error"]["message"]
    # Anonymous uploads count per address, apart from the tokens' counts.
    assert [post_image(client).status_code for _ in range(3)] == [200, 200, 429]
    assert post_image(client, address="10.0.0.9").status_code == 200


def test_wrong_tokens_count_against_the_address_so_guessing_is_limited_too(access_app):
    client = access_app(API_TOKENS=TOKEN_A, RATE_LIMIT="3/hour").test_client()
    guesses = [post_image(client, headers=bearer(f"guess-{i:02d}-0123456789abcdef")).status_code for i in range(5)]
    assert guesses == [401, 401, 401, 429, 429]
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 200  # the real token has its own count


def test_health_readiness_metrics_pages_and_static_files_are_never_rate_limited(access_app):
    client = access_app(RATE_LIMIT="1/hour").test_client()
    assert [post_image(client).status_code for _ in range(2)] == [200, 429]
    for path in ("/healthz", "/readyz", "/metrics", "/", "/model", "/static/style.css"):
        assert [client.get(path).status_code for _ in range(3)] == [200] * 3, path


def test_x_forwarded_for_is_ignored_unless_proxies_are_trusted(access_app):
    client = access_app(RATE_LIMIT="2/hour").test_client()
    forged = [post_image(client, headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(4)]
    assert [r.status_code for r in forged] == [200, 200, 429, 429]  # inventing addresses escapes nothing


def test_behind_one_trusted_proxy_the_client_is_the_address_the_proxy_appended(access_app):
    client = access_app(RATE_LIMIT="2/hour", TRUSTED_PROXIES=1).test_client()

    def via_proxy(client_address: str, claimed: str = ""):
        # The proxy appends the address it saw; whatever the client sent stays on the left.
        chain = f"{claimed}, {client_address}" if claimed else client_address
        return post_image(client, headers={"X-Forwarded-For": chain}, address="10.1.1.1").status_code

    assert [via_proxy("203.0.113.7", claimed=f"198.51.100.{i}") for i in range(3)] == [200, 200, 429]
    assert via_proxy("203.0.113.8") == 200  # another client behind the same proxy: its own count


def test_ipv6_clients_are_counted_per_64_network(access_app):
    client = access_app(RATE_LIMIT="2/hour").test_client()
    assert post_image(client, address="2001:db8:0:1::1").status_code == 200
    assert post_image(client, address="2001:db8:0:1::ffff").status_code == 200
    assert post_image(client, address="2001:db8:0:1:abcd::1").status_code == 429  # same /64
    assert post_image(client, address="2001:db8:0:2::1").status_code == 200  # next /64


def test_a_limit_applies_to_both_spellings_of_the_route_together(access_app):
    client = access_app(RATE_LIMIT="2/hour").test_client()
    assert [post_image(client, p).status_code for p in ("/file", "/file/", "/file", "/file/")] == [200, 200, 429, 429]


def test_a_rejected_upload_is_not_classified_or_stored(access_app):
    app = access_app(API_TOKENS=TOKEN_A, RATE_LIMIT="1/hour")
    client = app.test_client()
    stored_before = app.extensions["classifier"].status()["images"]
    assert post_image(client).status_code == 401
    assert post_image(client, headers=bearer(TOKEN_A)).status_code == 200
    assert client.post("/file/", data={"file": (io.BytesIO(image_bytes(BLUE)), "b.png")},
                       headers=bearer(TOKEN_A)).status_code == 429
    assert app.extensions["classifier"].status()["images"] == stored_before + 1


def test_several_limits_all_apply_and_the_tightest_is_reported(access_app):
    client = access_app(RATE_LIMIT="5/hour;2/day").test_client()
    answers = [post_image(client) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert "2 per 1 day" in answers[-1].get_json()["error"]["message"]


def test_the_access_settings_object_does_not_show_its_tokens(access_app):
    app = access_app(API_TOKENS=TOKEN_A)
    assert TOKEN_A not in repr(app.extensions["access"].settings)


# --- one client, one key: the rate limit, the admin login backoff and the feedback quota --------

ADMIN_TOKEN = "admin-token-0123456789abcdef"


def wrong_admin_tokens(client, times: int = 5, **kwargs) -> list[int]:
    return [client.get("/api/uploads", headers=bearer("not-the-admin-token-at-all"), **kwargs).status_code
            for _ in range(times)]


def test_the_login_backoff_counts_an_ipv6_client_per_64_like_the_rate_limit(access_app):
    client = access_app(ADMIN_TOKEN=ADMIN_TOKEN).test_client()
    assert wrong_admin_tokens(client, environ_base={"REMOTE_ADDR": "2001:db8:0:1::1"}) == [401] * 5
    # Another address in the same /64 is the same client: it waits too.
    assert client.get("/api/uploads", headers=bearer(ADMIN_TOKEN),
                      environ_base={"REMOTE_ADDR": "2001:db8:0:1::2"}).status_code == 429
    assert client.get("/api/uploads", headers=bearer(ADMIN_TOKEN),
                      environ_base={"REMOTE_ADDR": "2001:db8:0:2::1"}).status_code == 200


def test_behind_a_trusted_proxy_one_clients_failures_do_not_slow_down_another(access_app):
    client = access_app(ADMIN_TOKEN=ADMIN_TOKEN, TRUSTED_PROXIES=1).test_client()
    proxy = {"REMOTE_ADDR": "10.1.1.1"}  # every request comes from the proxy
    for _ in range(5):
        r = client.get("/api/uploads", environ_base=proxy,
                       headers={**bearer("not-the-admin-token-at-all"), "X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 401
    mine = client.get("/api/uploads", environ_base=proxy, headers={**bearer(ADMIN_TOKEN), "X-Forwarded-For": "203.0.113.8"})
    theirs = client.get("/api/uploads", environ_base=proxy,
                        headers={**bearer(ADMIN_TOKEN), "X-Forwarded-For": "203.0.113.7"})
    assert (mine.status_code, theirs.status_code) == (200, 429)


def test_without_trusted_proxies_a_forged_forwarded_for_does_not_escape_the_login_backoff(access_app):
    client = access_app(ADMIN_TOKEN=ADMIN_TOKEN).test_client()
    for i in range(5):
        r = client.get("/api/uploads", headers={**bearer("not-the-admin-token-at-all"),
                                                "X-Forwarded-For": f"198.51.100.{i}"})
        assert r.status_code == 401
    r = client.get("/api/uploads", headers={**bearer(ADMIN_TOKEN), "X-Forwarded-For": "198.51.100.99"})
    assert r.status_code == 429


def feedback_statuses(client, upload_id: str, times: int, **kwargs) -> list[int]:
    return [client.post(f"/uploads/{upload_id}/feedback", json={"label": "CAT"}, **kwargs).status_code
            for _ in range(times)]


def test_the_feedback_quota_counts_an_ipv6_client_per_64_and_a_proxied_client_by_its_own_address(access_app):
    app = access_app(FEEDBACK_PER_HOUR=2)
    client = app.test_client()
    upload_id = post_image(client).get_json()["id"]
    assert feedback_statuses(client, upload_id, 2, environ_base={"REMOTE_ADDR": "2001:db8:0:1::1"}) == [200, 200]
    assert feedback_statuses(client, upload_id, 1, environ_base={"REMOTE_ADDR": "2001:db8:0:1::9"}) == [429]
    assert feedback_statuses(client, upload_id, 1, environ_base={"REMOTE_ADDR": "2001:db8:0:2::1"}) == [200]

    proxied = access_app(FEEDBACK_PER_HOUR=2, TRUSTED_PROXIES=1).test_client()
    upload_id = post_image(proxied).get_json()["id"]
    proxy = {"REMOTE_ADDR": "10.1.1.1"}
    one = feedback_statuses(proxied, upload_id, 3, environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.7"})
    other = feedback_statuses(proxied, upload_id, 1, environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.8"})
    assert (one, other) == ([200, 200, 429], [200])


def test_forwarded_headers_reach_nothing_without_trusted_proxies(access_app):
    from flask import request

    app = access_app()
    seen = {}

    @app.get("/test-only/who")
    def who():
        seen.update(address=request.remote_addr, scheme=request.scheme,
                    forwarded=[h for h in request.headers.keys() if "forward" in h.lower()])
        return "ok"

    app.test_client().get("/test-only/who", headers={"X-Forwarded-For": "198.51.100.1", "X-Forwarded-Proto": "https",
                                                     "Forwarded": "for=198.51.100.1;proto=https"})
    assert seen == {"address": "127.0.0.1", "scheme": "http", "forwarded": []}


# --- heatmaps are guarded and limited like POST /file/ -------------------------------------------

def test_a_heatmap_needs_a_token_when_tokens_are_on(access_app):
    client = access_app(API_TOKENS=TOKEN_A).test_client()
    upload_id = post_image(client, headers=bearer(TOKEN_A)).get_json()["id"]
    path = f"/uploads/{upload_id}/heatmap.png"
    missing = client.get(path)
    assert missing.status_code == 401 and missing.get_json()["error"]["code"] == "missing_token"
    assert "heatmap" in missing.get_json()["error"]["message"]
    assert client.get(path, headers=bearer("not-" + TOKEN_A)).status_code == 401
    assert client.get(path, headers=bearer(TOKEN_A)).status_code not in (401, 429)


def test_heatmaps_are_rate_limited_per_client(access_app):
    app = access_app(RATE_LIMIT="2/hour")
    client = app.test_client()
    upload_id = post_image(client).get_json()["id"]
    path = f"/uploads/{upload_id}/heatmap.png"
    statuses = [client.get(path).status_code for _ in range(3)]
    assert statuses[2] == 429 and 429 not in statuses[:2], statuses
    refused = client.get(path)
    assert refused.get_json()["error"]["code"] == "rate_limited" and "heatmaps" in refused.get_json()["error"]["message"]
    assert client.get(path, environ_base={"REMOTE_ADDR": "10.0.0.9"}).status_code != 429  # another client


# --- the in-memory limiter is bounded -----------------------------------------------------------

def test_the_memory_limiter_holds_at_most_its_cap_of_counters(access_app, monkeypatch):
    from keras_serve.web import access

    monkeypatch.setattr(access, "MEMORY_MAX_KEYS", 50)
    app = access_app(RATE_LIMIT="100/hour")
    client = app.test_client()
    for i in range(300):  # 300 clients, each with a count that lasts an hour
        assert post_image(client, address=f"2001:db8:{i:x}::1").status_code == 200
    storage = app.extensions["access"].limiter.storage
    assert len(storage.storage) <= 50 and len(storage.expirations) <= 50 and len(storage.locks) <= 50


def test_the_memory_limiter_drops_counters_after_their_window(access_app, monkeypatch):
    import time
    import types

    from keras_serve.web import bounded_memory

    monkeypatch.setattr(bounded_memory, "SWEEP_INTERVAL_S", 0.0)
    app = access_app(RATE_LIMIT="100/second")
    client = app.test_client()
    for i in range(100):
        post_image(client, address=f"10.9.{i // 250}.{i % 250}")
    storage = app.extensions["access"].limiter.storage
    assert len(storage.storage) >= 100
    # 2.1 s later for the sweep's clock only (a counter lives two windows: the sliding window reads
    # the previous one). limits' own reaper keeps real time, so only the sweep can drop them here.
    later = time.time() + 2.1
    monkeypatch.setattr(bounded_memory, "time", types.SimpleNamespace(time=lambda: later))
    post_image(client, address="10.9.9.9")
    assert len(storage.storage) == 1  # only the newest client's counter is left
