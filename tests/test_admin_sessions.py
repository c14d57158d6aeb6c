"""A reviewer's browser session ends for good: logout, a new admin token and its lifetime end it
server-side, so a copy of the cookie replayed later is refused by every process sharing the
database (docs/security.md).

Replaying means sending the exact cookie the browser held before it logged out, as someone who
copied it would: a fresh client with that cookie set, not the browser's own (cleared) jar.
"""
from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from server_process import ServerProcess

TOKEN = "session-token-" + "s3cr" * 5
NEW_TOKEN = "session-token-" + "n3w!" * 5
COOKIE = "keras_serve_review"


@pytest.fixture()
def admin_app(make_app, colour_model_path):
    def make(token: str = TOKEN, **config):
        return make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=token, **config)
    return make


def log_in(client, token: str = TOKEN) -> tuple[str, str]:
    """Log in through the form; returns (the session cookie's value, the page's CSRF token)."""
    page = client.get("/review/login", headers={"Accept": "text/html"}).get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/review/login", data={"csrf_token": csrf, "token": token, "name": "ana"},
                    headers={"Accept": "text/html"})
    assert r.status_code == 303, r.get_data(as_text=True)
    review = client.get("/review", headers={"Accept": "text/html"}).get_data(as_text=True)
    return client.get_cookie(COOKIE).value, re.search(r'<meta name="csrf-token" content="([^"]+)"', review).group(1)


def replay(app, cookie: str):
    client = app.test_client()
    client.set_cookie(COOKIE, cookie)
    return client


def read_and_roll_back(client, csrf: str) -> tuple[int, int]:
    read = client.get("/api/uploads").status_code
    rollback = client.post("/api/models/rollback", headers={"X-CSRFToken": csrf}).status_code
    return read, rollback


def test_a_cookie_replayed_after_logout_can_neither_read_nor_roll_back(admin_app):
    app = admin_app()
    browser = app.test_client()
    cookie, csrf = log_in(browser)
    # Before logout the copy works like the browser: it reads, and reaches the rollback
    # (409: nothing was promoted, so there is nothing to roll back).
    assert read_and_roll_back(replay(app, cookie), csrf) == (200, 409)
    assert browser.post("/review/logout", data={"csrf_token": csrf}).status_code == 303
    assert read_and_roll_back(replay(app, cookie), csrf) == (401, 401)
    assert read_and_roll_back(browser, csrf) == (401, 401)


def test_logout_in_one_process_ends_the_session_in_another_sharing_the_database(admin_app):
    first, second = admin_app(), admin_app()  # two workers (or replicas) on one database
    browser = first.test_client()
    cookie, csrf = log_in(browser)
    assert read_and_roll_back(replay(second, cookie), csrf) == (200, 409)
    browser.post("/review/logout", data={"csrf_token": csrf})
    assert read_and_roll_back(replay(second, cookie), csrf) == (401, 401)


def test_a_server_started_with_a_new_admin_token_ends_every_session_of_the_old_one(admin_app):
    old = admin_app()
    cookie, csrf = log_in(old.test_client())
    assert read_and_roll_back(replay(old, cookie), csrf) == (200, 409)
    new = admin_app(NEW_TOKEN)  # the token rotated: this replica restarted with the new one
    assert read_and_roll_back(replay(new, cookie), csrf) == (401, 401)
    # A replica still running with the old token refuses it too: the session row is gone.
    assert read_and_roll_back(replay(old, cookie), csrf) == (401, 401)
    # The new token logs in as usual.
    fresh_cookie, fresh_csrf = log_in(new.test_client(), NEW_TOKEN)
    assert read_and_roll_back(replay(new, fresh_cookie), fresh_csrf) == (200, 409)


def test_a_session_ends_after_admin_session_hours(admin_app):
    app = admin_app(ADMIN_SESSION_HOURS=1)
    sessions = app.extensions["admin_auth"].sessions
    started, passed = sessions.clock(), [0.0]
    sessions.clock = lambda: started + timedelta(seconds=passed[0])  # not a real wait, which a slow request could outlast
    cookie, csrf = log_in(app.test_client())
    passed[0] = 3599
    assert read_and_roll_back(replay(app, cookie), csrf) == (200, 409)
    passed[0] = 3601
    assert read_and_roll_back(replay(app, cookie), csrf) == (401, 401)


def test_the_database_holds_no_session_id_and_no_token(admin_app, tmp_path):
    app = admin_app()
    cookie, _ = log_in(app.test_client())
    session_id = app.session_interface.get_signing_serializer(app).loads(cookie)["sid"]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'uploads' / 'uploads.db'}")
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM admin_sessions")).mappings()]
    engine.dispose()
    assert len(rows) == 1 and rows[0]["reviewer"] == "ana"
    assert rows[0]["id"] == hashlib.sha256(session_id.encode()).hexdigest()
    stored = " ".join(str(v) for v in rows[0].values())
    assert session_id not in stored and TOKEN not in stored


def test_over_http_with_two_workers_a_replayed_cookie_is_refused_by_both(colour_model_path, tmp_path):
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / "uploads"),
                       "--workers", "2", env={"KERAS_SERVE_ADMIN_TOKEN": TOKEN}) as srv:
        browser = requests.Session()
        page = browser.get(srv.url + "/review/login", headers={"Accept": "text/html"}, timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        r = browser.post(srv.url + "/review/login", data={"csrf_token": csrf, "token": TOKEN, "name": "ana"},
                         headers={"Accept": "text/html"}, allow_redirects=False, timeout=10)
        assert r.status_code == 303
        review = browser.get(srv.url + "/review", headers={"Accept": "text/html"}, timeout=10).text
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', review).group(1)
        cookie = browser.cookies[COOKIE]  # as the page left it: holding the CSRF token's secret

        def replayed() -> set[tuple[int, int]]:
            # New connections, so both workers answer some of them.
            seen = set()
            for _ in range(12):
                headers = {"Cookie": f"{COOKIE}={cookie}", "Connection": "close"}
                read = requests.get(srv.url + "/api/uploads", headers=headers, timeout=10).status_code
                rollback = requests.post(srv.url + "/api/models/rollback", timeout=10,
                                         headers={**headers, "X-CSRFToken": csrf}).status_code
                seen.add((read, rollback))
            return seen

        assert replayed() == {(200, 409)}
        assert browser.post(srv.url + "/review/logout", data={"csrf_token": csrf}, allow_redirects=False,
                            timeout=10).status_code == 303
        assert replayed() == {(401, 401)}
