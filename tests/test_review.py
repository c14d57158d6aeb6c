"""The review loop over HTTP, on each storage back end: who may review, the listing, corrections,
public feedback and the dataset export (see docs/review.md)."""
import csv
import hashlib
import logging
import re
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from images import BLUE, RED, image_bytes
from uploading import post_file

TOKEN = "review-token-" + "k3y" * 6
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


class FrozenClock:
    """A clock that moves only when the test says: time.monotonic / time.time stand-in."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def colour(i: int) -> tuple[int, int, int]:
    """Red to blue in steps: DOG very sure, ... unsure ..., CAT very sure (the colour model)."""
    red = 30 + (i * 37) % 200
    return red, 20, 250 - red


@pytest.fixture()
def review_app(make_app, colour_model_path, storage_config):
    return make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, **storage_config)


@pytest.fixture()
def api(review_app):
    return review_app.test_client()


def upload(client, i: int = 0) -> dict:
    r = post_file(client, image_bytes(colour(i), (40 + i % 7, 30), fmt="PNG"), filename=f"p{i}.png")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def login(client, token: str = TOKEN, name: str = "ana") -> object:
    page = client.get("/review/login", headers={"Accept": "text/html"})
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    return client.post("/review/login", data={"csrf_token": csrf, "token": token, "name": name},
                       headers={"Accept": "text/html"})


def page_csrf(client) -> str:
    page = client.get("/review", headers={"Accept": "text/html"})
    assert page.status_code == 200
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page.get_data(as_text=True)).group(1)


ADMIN_GETS = ["/review", "/api/uploads", "/api/uploads/counts", "/api/uploads/{id}/thumbnail",
              "/api/uploads/{id}/reviews"]
ADMIN_POSTS = [("/api/uploads/{id}/review", {"label": "CAT"}), ("/api/uploads/review", {"reviews": []}),
               ("/review/logout", None)]


# --- access -------------------------------------------------------------------------------

def test_review_is_off_without_a_token_and_every_route_is_404(make_app, colour_model_path, tmp_path):
    app = make_app(MODEL_PATH=str(colour_model_path))
    client = app.test_client()
    upload_id = upload(client)["id"]
    for path in ADMIN_GETS + ["/review/login"]:
        assert client.get(path.format(id=upload_id), headers=BEARER).status_code == 404, path
    for path, body in ADMIN_POSTS + [("/review/login", None)]:
        assert client.post(path.format(id=upload_id), json=body, headers=BEARER).status_code == 404, path
    assert client.get(f"/uploads/{upload_id}").status_code == 200  # the public URL is unchanged


def test_every_admin_route_refuses_without_credentials_and_with_a_wrong_one(api):
    from keras_serve.web.admin_auth import MAX_DELAY_S

    upload_id = upload(api)["id"]
    # Each wrong token counts towards the login backoff (tested below); past every backoff
    # after each request, each answer here must be the 401 itself.
    clock = api.application.extensions["admin_auth"].throttle.clock = FrozenClock()
    wrong = [{}, {"Authorization": "Bearer " + TOKEN[:-1]}, {"Authorization": "Bearer " + TOKEN + "x"},
             {"Authorization": "Basic " + TOKEN}, {"Authorization": "Bearer"}, {"Authorization": TOKEN}]
    for headers in wrong:
        for path in ADMIN_GETS:
            r = api.get(path.format(id=upload_id), headers={**headers, "Accept": "application/json"})
            clock.advance(MAX_DELAY_S + 1)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.get_json()["error"]["code"] == "not_authorized"
            assert "Bearer" in r.headers["WWW-Authenticate"]
        for path, body in ADMIN_POSTS:
            r = api.post(path.format(id=upload_id), json=body, headers={**headers, "Accept": "application/json"})
            clock.advance(MAX_DELAY_S + 1)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.get_json()["error"]["code"] == "not_authorized"
    # a browser without a session is sent to the login form
    r = api.get("/review", headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/review/login")
    # nothing was reviewed by any of that
    assert api.get(f"/api/uploads/{upload_id}/reviews", headers=BEARER).get_json()["reviews"] == []


def test_bearer_token_works_and_the_token_is_never_logged_nor_a_metric(api, caplog):
    upload_id = upload(api)["id"]
    caplog.set_level(logging.DEBUG)
    assert api.get("/api/uploads", headers=BEARER).status_code == 200
    assert api.get("/api/uploads", headers={"Authorization": "Bearer wrong-" + TOKEN}).status_code == 401
    login(api.application.test_client())
    r = api.post(f"/api/uploads/{upload_id}/review", json={"confirm": True}, headers=BEARER)
    assert r.status_code == 200
    seen = caplog.text + api.get("/metrics").get_data(as_text=True) + api.get("/model").get_data(as_text=True)
    assert TOKEN not in seen and TOKEN[:12] not in seen
    assert "/api/uploads" in api.get("/metrics").get_data(as_text=True)  # the route is counted, not the token


def test_browser_login_gives_a_strict_http_only_session_and_logout_ends_it(review_app):
    client = review_app.test_client()
    r = login(client)
    assert r.status_code == 303 and r.headers["Location"].endswith("/review")
    cookie = [v for k, v in r.headers.items() if k == "Set-Cookie" and v.startswith("keras_serve_review=")][-1]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    page = client.get("/review", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "Review uploads" in page.get_data(as_text=True)
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    csrf = page_csrf(client)
    assert client.post("/review/logout", data={"csrf_token": csrf}).status_code == 303
    assert client.get("/api/uploads").status_code == 401


def test_the_session_cookie_is_secure_over_tls(review_app, make_app, colour_model_path, storage_config):
    behind_proxy = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, TRUSTED_PROXIES=1, **storage_config)
    for app, kwargs in ((review_app, {"base_url": "https://review.example"}),
                        (behind_proxy, {"headers": {"X-Forwarded-Proto": "https"}})):
        page = app.test_client().get("/review/login", headers={"Accept": "text/html", **kwargs.get("headers", {})},
                                     base_url=kwargs.get("base_url", "http://localhost"))
        cookie = page.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # Without a trusted proxy the header is the client's own claim: the connection is plain HTTP.
    page = review_app.test_client().get("/review/login", headers={"Accept": "text/html", "X-Forwarded-Proto": "https"})
    assert "Secure" not in page.headers["Set-Cookie"]


def test_a_wrong_login_is_refused_and_repeated_failures_are_slowed_down(review_app):
    clock = review_app.extensions["admin_auth"].throttle.clock = FrozenClock()
    client = review_app.test_client()
    for attempt in range(5):
        r = login(client, token="not-the-token-at-all")
        assert r.status_code == 401 and "not right" in r.get_data(as_text=True)
    r = login(client, token=TOKEN)  # even the right token waits its turn now
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert client.get("/api/uploads", headers=BEARER).status_code == 429  # the same address, by Bearer too
    other = review_app.test_client()
    r = other.get("/api/uploads", headers=BEARER, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert r.status_code == 200  # other clients are not locked out
    wait = int(login(client, token=TOKEN).headers["Retry-After"])
    clock.advance(wait - 0.5)
    assert login(client, token=TOKEN).status_code == 429  # not before its time
    clock.advance(0.6)
    assert login(client, token=TOKEN).status_code == 303


def test_an_expired_session_is_refused(make_app, colour_model_path, tmp_path):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, ADMIN_SESSION_HOURS=1)
    sessions = app.extensions["admin_auth"].sessions
    started, clock = sessions.clock(), FrozenClock(0.0)
    sessions.clock = lambda: started + timedelta(seconds=clock())
    client = app.test_client()
    assert login(client).status_code == 303
    assert client.get("/api/uploads").status_code == 200
    clock.advance(3599)
    assert client.get("/api/uploads").status_code == 200
    clock.advance(2)  # past the hour
    assert client.get("/api/uploads").status_code == 401


def test_cookie_posts_need_the_csrf_token_and_our_origin(review_app):
    client = review_app.test_client()
    upload_id = upload(client)["id"]  # blue: CAT
    login(client)
    csrf = page_csrf(client)
    path = f"/api/uploads/{upload_id}/review"
    assert client.post(path, json={"label": "DOG"}).status_code == 400                          # no token
    assert client.post(path, json={"label": "CAT"}, headers={"X-CSRFToken": "forged"}).status_code == 400
    r = client.post(path, json={"label": "CAT"}, headers={"X-CSRFToken": csrf, "Origin": "https://evil.example"})
    assert r.status_code == 401
    r = client.post(path, json={"label": "CAT"}, headers={"X-CSRFToken": csrf, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 401
    assert client.get(f"/api/uploads/{upload_id}/reviews").get_json()["reviews"] == []
    r = client.post(path, json={"label": "DOG"}, headers={"X-CSRFToken": csrf, "Origin": "http://localhost"})
    assert r.status_code == 200 and r.get_json()["state"] == "corrected"
    # the login form itself needs its token too
    fresh = review_app.test_client()
    assert fresh.post("/review/login", data={"token": TOKEN}).status_code == 400


# --- corrections --------------------------------------------------------------------------

def test_a_review_is_its_own_row_history_kept_latest_counts(api):
    first = upload(api, 5)  # reddish: DOG
    upload_id = first["id"]
    assert first["label"] == "DOG"
    r = api.post(f"/api/uploads/{upload_id}/review", json={"label": "CAT"}, headers={**BEARER, "X-Reviewer": "bo"})
    assert r.get_json()["state"] == "corrected" and r.get_json()["counts"]["corrected"] == 1
    r = api.post(f"/api/uploads/{upload_id}/review", json={"label": "neither"}, headers=BEARER)
    assert r.get_json()["label"] == "neither"
    r = api.post(f"/api/uploads/{upload_id}/review", json={"confirm": True}, headers=BEARER)
    assert r.get_json() | {"counts": None} == {"id": upload_id, "label": "DOG", "state": "confirmed", "counts": None}
    history = api.get(f"/api/uploads/{upload_id}/reviews", headers=BEARER).get_json()["reviews"]
    assert [(h["label"], h["reviewer"]) for h in history] == [("CAT", "bo"), ("neither", "api"), ("DOG", "api")]
    listed = api.get("/api/uploads", headers=BEARER).get_json()["uploads"][0]
    assert listed["review"]["label"] == "DOG" and listed["review"]["state"] == "confirmed"
    assert listed["prediction"]["label"] == "DOG"  # the prediction itself is never changed
    assert api.get(f"/uploads/{upload_id}/record").get_json()["prediction"]["label"] == "DOG"


def test_bulk_review_and_bad_review_bodies(api):
    ids = [upload(api, i)["id"] for i in range(4)]
    r = api.post("/api/uploads/review", headers=BEARER, json={"reviews": [
        {"id": ids[0], "confirm": True}, {"id": ids[1], "label": "neither"}, {"id": "f" * 32, "label": "CAT"}]})
    body = r.get_json()
    assert r.status_code == 200 and [x["id"] for x in body["reviewed"]] == ids[:2] and body["not_found"] == ["f" * 32]
    assert body["counts"] | {} == {"total": 4, "to_review": 2, "reviewed": 2, "confirmed": 1, "corrected": 1,
                                   "feedback_disagrees": 0}
    for bad in ({"label": "HORSE"}, {"label": None}, {}, {"label": ["CAT"]}, [], "CAT"):
        r = api.post(f"/api/uploads/{ids[2]}/review", json=bad, headers=BEARER)
        assert r.status_code == 400, bad
    assert api.post(f"/api/uploads/{'0' * 32}/review", json={"label": "CAT"}, headers=BEARER).status_code == 404
    assert api.post("/api/uploads/../x/review", json={"label": "CAT"}, headers=BEARER).status_code == 404
    assert api.post("/api/uploads/review", json={"reviews": [{"id": "../../etc", "label": "CAT"}]},
                    headers=BEARER).status_code == 400
    assert api.post("/api/uploads/review", json={"reviews": [{"id": ids[3], "confirm": True}] * 201},
                    headers=BEARER).status_code == 400
    r = api.post(f"/api/uploads/{ids[2]}/review", data="{not json", headers={**BEARER, "Content-Type": "application/json"})
    assert r.status_code == 400 and "Traceback" not in r.get_data(as_text=True)


def test_a_bulk_confirm_never_replaces_a_persons_decision(review_app):
    client = review_app.test_client()
    made = [upload(client, i) for i in range(4)]
    ids = [m["id"] for m in made]
    login(client, name="ana")
    csrf = {"X-CSRFToken": page_csrf(client)}
    client.post(f"/api/uploads/{ids[0]}/review", json={"label": "neither"}, headers=csrf)
    client.post(f"/api/uploads/{ids[1]}/review", json={"label": "CAT" if made[1]["label"] == "DOG" else "DOG"},
                headers=csrf)
    corrected = {upload_id: latest_review(client, upload_id) for upload_id in ids[:2]}

    # what the page's "confirm" button sends: every upload on the page
    r = client.post("/api/uploads/review", json={"reviews": [{"id": i, "confirm": True} for i in ids]}, headers=csrf)

    assert r.status_code == 200
    body = r.get_json()
    assert [x["id"] for x in body["reviewed"]] == ids[2:] and body["already_reviewed"] == ids[:2]
    assert {x["state"] for x in body["reviewed"]} == {"confirmed"}
    for upload_id, label in corrected.items():
        history = client.get(f"/api/uploads/{upload_id}/reviews").get_json()["reviews"]
        assert [h["label"] for h in history] == [label]  # no second row: nothing was replaced
        assert latest_review(client, upload_id) == label
    assert body["counts"]["corrected"] == 2 and body["counts"]["confirmed"] == 2
    # a person confirming one upload still may: that is a decision, not a bulk action
    r = client.post(f"/api/uploads/{ids[0]}/review", json={"confirm": True}, headers=csrf)
    assert r.get_json()["state"] == "confirmed"


def latest_review(client, upload_id: str) -> str:
    listed = client.get("/api/uploads?limit=200").get_json()["uploads"]
    return next(u["review"]["label"] for u in listed if u["id"] == upload_id)


def test_a_card_shows_the_reviewers_label_highlighted_once_there_is_one(api):
    red = upload(api, 5)  # reddish: the model says DOG
    assert red["label"] == "DOG"
    api.post(f"/api/uploads/{red['id']}/review", json={"label": "neither"}, headers=BEARER)
    unreviewed = upload(api, 5)["id"]

    page = api.get("/review", headers={**BEARER, "Accept": "text/html"}).get_data(as_text=True)

    cards = {m.group(1): m.group(0) for m in re.finditer(r'<li class="card[^"]*" data-id="([0-9a-f]{32})".*?</li>',
                                                          page, re.S)}
    reviewed_card = cards[red["id"]]
    decision = re.search(r'<span class="decision" data-decision( hidden)?>([^<]*)</span>', reviewed_card)
    assert decision.group(1) is None and decision.group(2) == "neither"
    assert re.search(r'class="right chosen">neither</button>', reviewed_card)
    assert re.search(r'class="secondary">DOG</button>', reviewed_card)  # the model's label no longer stands out
    fresh_card = cards[unreviewed]
    assert re.search(r'<span class="decision" data-decision hidden></span>', fresh_card)
    assert re.search(r'class="right">DOG</button>', fresh_card)  # before any review: the model's label


def test_counts_are_never_more_than_ten_seconds_old(api):
    store = api.application.extensions["review_store"]
    clock = store.monotonic = FrozenClock()

    def counts() -> dict:
        return api.get("/api/uploads/counts", headers=BEARER).get_json()

    upload(api, 0)
    assert counts()["total"] == 1
    for i in range(1, 4):
        upload(api, i)
    clock.advance(4.9)
    assert counts()["total"] == 1  # a count under 5 s old is reused as it is
    clock.advance(300)             # a quiet spell of minutes, then someone opens the page
    assert counts() | {} == {"total": 4, "to_review": 4, "reviewed": 0, "confirmed": 0, "corrected": 0,
                             "feedback_disagrees": 0}
    assert store.recounting is None  # that call counted itself; nothing ran in the background

    upload(api, 4)
    clock.advance(10.01)  # just past the promise: counted again before the answer
    assert counts()["total"] == 5

    upload(api, 5)
    clock.advance(6)  # 5 to 10 s old: still answered, and recounted in the background for the next call
    assert counts()["total"] == 5
    store.recounting.join(timeout=30)
    assert not store.recounting.is_alive()
    assert counts()["total"] == 6


# --- public feedback ----------------------------------------------------------------------

def test_feedback_is_stored_apart_unverified_and_limited_per_client(make_app, colour_model_path, storage_config):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, FEEDBACK_PER_HOUR=3, **storage_config)
    client = app.test_client()
    page = post_file(client, image_bytes(RED, fmt="PNG"), headers={"Accept": "text/html"}).get_data(as_text=True)
    action = re.search(r'<form id="feedback"[^>]*action="([^"]+)"', page).group(1)
    upload_id = action.split("/")[2]
    assert 'value="CAT"' in page and 'value="neither"' in page
    r = client.post(action, data={"label": "CAT"}, headers={"Accept": "text/html", "Origin": "http://localhost"})
    assert r.status_code == 200 and "Thank you" in r.get_data(as_text=True)
    listed = client.get("/api/uploads?feedback=disagrees", headers=BEARER).get_json()["uploads"]
    assert [u["id"] for u in listed] == [upload_id] and listed[0]["feedback"]["label"] == "CAT"
    assert listed[0]["review"]["state"] == "not_reviewed"  # feedback is not a review
    assert client.get("/api/uploads/counts", headers=BEARER).get_json()["feedback_disagrees"] == 1
    # another site cannot post it for a visitor
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        assert client.post(action, data={"label": "DOG"}, headers=headers).status_code == 401
    assert client.post(action, data={"label": "HORSE"}).status_code == 400
    assert client.post(f"/uploads/{'0' * 32}/feedback", data={"label": "CAT"}).status_code == 404
    assert client.post(action, data={"label": "DOG"}).get_json()["agrees"] is True
    assert client.post(action, data={"label": "neither"}).status_code == 200
    r = client.post(action, data={"label": "neither"})  # the 4th answer this hour from this address
    assert r.status_code == 429 and r.headers["Retry-After"] == "3600"
    assert client.post(action, data={"label": "CAT"}, environ_base={"REMOTE_ADDR": "10.0.0.9"}).status_code == 200
    latest = client.get("/api/uploads?feedback=any", headers=BEARER).get_json()["uploads"][0]["feedback"]
    assert latest["label"] == "CAT"


# --- the listing --------------------------------------------------------------------------

def test_listing_filters_orders_and_keyset_pages(api):
    made = [upload(api, i) for i in range(12)]
    ids = [m["id"] for m in made]
    everything = api.get("/api/uploads?limit=200", headers=BEARER).get_json()["uploads"]
    assert [u["id"] for u in everything] == ids[::-1]  # newest first
    assert everything[0]["thumbnail_url"] == f"/api/uploads/{ids[-1]}/thumbnail"

    # keyset pages: every upload exactly once, in order, whatever the page size
    for order, expected in (("newest", ids[::-1]), ("oldest", ids),
                            ("least_sure", [m["id"] for m in sorted(made, key=lambda m: (m["confidence"], m["id"]))])):
        seen, cursor = [], None
        while True:
            r = api.get("/api/uploads", query_string={"order": order, "limit": 5, **({"cursor": cursor} if cursor else {})},
                        headers=BEARER)
            assert r.status_code == 200
            seen += [u["id"] for u in r.get_json()["uploads"]]
            cursor = r.get_json()["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, order

    def listed(**query):
        r = api.get("/api/uploads", query_string={"limit": 200, **query}, headers=BEARER)
        assert r.status_code == 200, r.get_json()
        return {u["id"] for u in r.get_json()["uploads"]}

    assert listed(label="CAT") == {m["id"] for m in made if m["label"] == "CAT"}
    assert listed(min_confidence=0.9) == {m["id"] for m in made if m["confidence"] >= 0.9}
    assert listed(min_confidence=0.5, max_confidence=0.8) == {m["id"] for m in made if 0.5 <= m["confidence"] <= 0.8}
    model = api.get("/model").get_json()
    assert listed(model=model["sha256"]) == set(ids) == listed(model=model["file"])
    assert listed(model="0" * 64) == set()
    assert listed(since="2000-01-01", until="2999-01-01T00:00Z") == set(ids)
    assert listed(until="2000-01-01") == set()
    api.post(f"/api/uploads/{ids[0]}/review", json={"confirm": True}, headers=BEARER)
    api.post(f"/api/uploads/{ids[1]}/review", json={"label": "neither"}, headers=BEARER)
    assert listed(reviewed="yes") == {ids[0], ids[1]} and listed(reviewed="no") == set(ids[2:])
    assert listed(corrected="yes") == {ids[1]} and listed(corrected="no") == {ids[0]}
    r = api.get(f"/api/uploads/{ids[3]}/thumbnail", headers=BEARER)
    assert r.status_code == 200 and r.mimetype == "image/webp" and r.data[:4] == b"RIFF"
    # made once: kept in the local cache, served from there next time (even with the upload's image gone)
    cached = Path(api.application.config["UPLOAD_DIR"]) / ".thumbnails" / ids[3][:2] / f"{ids[3]}.webp"
    assert cached.read_bytes() == r.data
    from PIL import Image
    import io
    assert max(Image.open(io.BytesIO(r.data)).size) <= 256
    store = api.application.extensions["classifier"].store
    store.images.delete(store.records.get(ids[3])["image_key"])
    assert api.get(f"/api/uploads/{ids[3]}/thumbnail", headers=BEARER).data == r.data


def test_hostile_cursors_and_filters_are_400_never_500(api):
    for i in range(3):
        upload(api, i)
    good = api.get("/api/uploads?limit=1", headers=BEARER).get_json()["next_cursor"]
    assert good
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    for query in ({"cursor": tampered}, {"cursor": "x"}, {"cursor": "' OR 1=1 --"}, {"cursor": "A" * 5000},
                  {"cursor": good, "order": "least_sure"}, {"cursor": "eyJvIjoibmV3ZXN0In0"},
                  {"order": "random()"}, {"limit": "0"}, {"limit": "201"}, {"limit": "-1"}, {"limit": "1e3"},
                  {"min_confidence": "nan"}, {"max_confidence": "2"}, {"since": "yesterday"},
                  {"reviewed": "maybe"}, {"feedback": "lots"}, {"label": "x" * 65}):
        r = api.get("/api/uploads", query_string=query, headers=BEARER)
        assert r.status_code == 400, (query, r.status_code)
        assert r.get_json()["error"]["code"] == "review_request"
    # a cursor signed with another server's token is refused too
    from itsdangerous import URLSafeSerializer
    forged = URLSafeSerializer("guessed", salt="keras-serve listing cursor").dumps({"o": "newest", "k": ["x", "y"]})
    assert api.get("/api/uploads", query_string={"cursor": forged}, headers=BEARER).status_code == 400
    assert api.get(f"/api/uploads/{'0' * 32}/thumbnail", headers=BEARER).status_code == 404
    assert api.get("/api/uploads/..%2F..%2Fapp.py/thumbnail", headers=BEARER).status_code == 404


# --- the dataset export -------------------------------------------------------------------

def test_export_dataset_folders_manifest_dedup_same_bytes_and_idempotent(api, review_app, tmp_path):
    from keras_serve.storage.dataset_export import export_dataset

    store = review_app.extensions["classifier"].store
    red, blue = image_bytes(RED, fmt="PNG"), image_bytes(BLUE, fmt="PNG")
    a = post_file(api, red).get_json()["id"]
    a_again = post_file(api, red).get_json()["id"]       # the same bytes twice
    b = post_file(api, blue).get_json()["id"]
    c = post_file(api, image_bytes(colour(5), fmt="PNG")).get_json()["id"]
    out_of_scope = post_file(api, image_bytes((20, 200, 20), fmt="PNG")).get_json()["id"]
    only_feedback = post_file(api, image_bytes((200, 40, 40), (50, 50), fmt="PNG")).get_json()["id"]
    api.post("/api/uploads/review", headers=BEARER, json={"reviews": [
        {"id": a, "confirm": True}, {"id": a_again, "label": "DOG"}, {"id": b, "label": "CAT"},
        {"id": c, "label": "CAT"}, {"id": out_of_scope, "label": "neither"}]})
    api.post(f"/uploads/{only_feedback}/feedback", data={"label": "CAT"})

    out = tmp_path / "dataset"
    counts = export_dataset(store, out)
    manifest = list(csv.DictReader((out / "manifest.csv").open()))
    assert {(row["label"], row["source"]) for row in manifest} == {("DOG", "review"), ("CAT", "review")}
    assert len(manifest) == 3 and counts.duplicates == 1 and counts.skipped_neither == 1
    for row in manifest:
        data = (out / row["label"] / f"{row['sha256']}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert data == store.read_image(row["id"])[0]  # exactly the accepted bytes
    assert (out / "DOG" / f"{hashlib.sha256(red).hexdigest()}.png").read_bytes() == red
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    again = export_dataset(store, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert again.written == 0 and again.kept == 3

    # a changed review moves the file; unverified feedback only when asked; our files only are touched
    (out / "notes.txt").write_text("mine")
    api.post(f"/api/uploads/{c}/review", json={"label": "DOG"}, headers=BEARER)
    export_dataset(store, out, include_unverified=True, include_neither=True, folders={"CAT": "cats", "DOG": "dogs"})
    rows = {row["id"]: row for row in csv.DictReader((out / "manifest.csv").open())}
    assert rows[only_feedback]["source"] == "feedback" and rows[only_feedback]["label"] == "cats"
    assert rows[c]["label"] == "dogs" and rows[out_of_scope]["label"] == "neither"
    assert not (out / "CAT").exists() and not (out / "DOG").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["cats", "dogs", "manifest.csv", "neither", "notes.txt"]


def test_export_dataset_command_line(review_app, api, storage_config, tmp_path, monkeypatch):
    upload_id = upload(api, 3)["id"]
    api.post(f"/api/uploads/{upload_id}/review", json={"label": "CAT"}, headers=BEARER)
    args = [sys.executable, "-m", "keras_serve.storage", "--upload-dir", storage_config["UPLOAD_DIR"]]
    if storage_config.get("DATABASE_URL"):
        args += ["--database-url", storage_config["DATABASE_URL"], "--image-store", storage_config["IMAGE_STORE"]]
    out = tmp_path / "exported"
    done = subprocess.run([*args, "export-dataset", str(out), "--reviewed-only", "--since", "2020-01-01"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 written" in done.stderr
    assert [p.parent.name for p in out.rglob("*.png")] == ["CAT"]
    done = subprocess.run([*args, "export-dataset", str(out), "--since", "2999-01-01"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and list(out.rglob("*.png")) == []
    bad = subprocess.run([*args, "export-dataset", str(out), "--reviewed-only", "--include-unverified"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "not allowed with" in bad.stderr


# --- the schema ---------------------------------------------------------------------------

def new_database_url(engine: str, tmp_path, request) -> str:
    """An empty database: a new SQLite file, or a PostgreSQL database dropped after the test."""
    if engine == "sqlite":
        return f"sqlite:///{tmp_path / 'uploads.db'}"
    postgres = request.getfixturevalue("postgres")
    url = postgres.create_database()
    request.addfinalizer(lambda: postgres.drop_database(url))
    return url


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_of_the_previous_version_is_migrated_keeping_its_rows(engine, tmp_path, request):
    from keras_serve.storage.records import _UPLOADS_V1, SCHEMA_VERSION, RecordStore, schema_migrations

    url = new_database_url(engine, tmp_path, request)
    old = sa.create_engine(url)
    with old.begin() as conn:  # what version 1 made, with one upload in it
        _UPLOADS_V1.create(conn)
        schema_migrations.create(conn)
        conn.execute(schema_migrations.insert().values(version=1, applied=sa.func.now()))
        conn.execute(_UPLOADS_V1.insert().values(
            id="a" * 32, received=sa.func.now(), bytes=3, sha256="0" * 64, format="PNG", model="m.h5",
            prediction={"label": "CAT", "confidence": 0.75}, image_key=f"2026/12/01/{'a' * 32}.png"))
    for _ in range(2):  # and starting again changes nothing
        store = RecordStore(url)
        row = store.get("a" * 32)
        assert row["predicted_label"] == "CAT" and row["confidence"] == 0.75 and row["review_state"] == 0
        assert row["prediction"] == {"label": "CAT", "confidence": 0.75}
        store.close()
    with old.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY version")).all() == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert conn.execute(sa.text("SELECT count(*) FROM uploads")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM reviews")).scalar() == 0
    old.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_worker_processes_starting_together_on_a_new_database_all_find_it_ready(engine, tmp_path, request, caplog):
    """What `python app.py` does on a first start: one store per worker, all migrating a new
    database at once; each has its own connections, as separate processes would."""
    from keras_serve.storage.records import SCHEMA_VERSION, RecordStore

    url = new_database_url(engine, tmp_path, request)
    starting = threading.Barrier(6)
    stores: list = []

    def start() -> None:
        starting.wait()
        stores.append(RecordStore(url))

    with caplog.at_level(logging.WARNING, logger="keras_serve.storage.records"):
        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [r.getMessage() for r in caplog.records] == []
    assert len(stores) == 6 and all(store._schema_ready for store in stores)
    with stores[0].engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY version")).scalars().all() == \
            list(range(1, SCHEMA_VERSION + 1))
    for store in stores:
        store.close()


def test_retention_deletes_an_uploads_reviews_feedback_and_thumbnail(make_app, colour_model_path, storage_config,
                                                                     no_retention_thread):
    from keras_serve.storage.records import feedback, reviews

    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, UPLOAD_RETENTION_DAYS=1 / 86400,
                   **storage_config)
    client = app.test_client()
    upload_id = upload(client)["id"]
    client.post(f"/api/uploads/{upload_id}/review", json={"label": "DOG"}, headers=BEARER)
    client.post(f"/uploads/{upload_id}/feedback", data={"label": "neither"})
    assert client.get(f"/api/uploads/{upload_id}/thumbnail", headers=BEARER).status_code == 200
    cached = Path(storage_config["UPLOAD_DIR"]) / ".thumbnails" / upload_id[:2] / f"{upload_id}.webp"
    assert cached.exists()
    store = app.extensions["classifier"].store
    received = store.clock()
    store.clock = lambda: received + 2  # two seconds on: past the one-second retention
    assert store.prune()["expired"] == 1
    with store.records.engine.connect() as conn:
        for table in (reviews, feedback):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
    assert not cached.exists()
    assert client.get(f"/api/uploads/{upload_id}/thumbnail", headers=BEARER).status_code == 404
