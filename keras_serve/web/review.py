"""The reviewer's page and its JSON API, for holders of the admin token only.

    GET  /review                        the grid (server-rendered; static/review.js adds the keys)
    GET  /review/login, POST            the login form -> session cookie
    POST /review/logout
    GET  /api/uploads                   the listing: filters, order, keyset cursor
    GET  /api/uploads/counts            totals for the page's header
    GET  /api/uploads/<id>/thumbnail    256 px WebP, made once
    GET  /api/uploads/<id>/reviews      every review of one upload (the history)
    POST /api/uploads/<id>/review       {"label": "DOG"} or {"confirm": true}
    POST /api/uploads/review            {"reviews": [{"id": ..., "label": ...} | {"id": ..., "confirm": true}]}

With no admin token configured every one of these answers 404, as if it did not exist.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from flask import (Blueprint, Response, abort, current_app, g, jsonify, redirect, render_template, request,
                   url_for)
from flask_wtf.csrf import generate_csrf
from itsdangerous import BadData, URLSafeSerializer

from keras_serve.errors import NotAuthorizedError, ReviewRequestError, UploadNotFound
from keras_serve.storage.records import NEITHER
from keras_serve.storage.reviewing import DEFAULT_PAGE, MAX_PAGE, ORDERS, ListingQuery, ReviewStore, listed_upload
from keras_serve.storage.thumbnails import ThumbnailCache
from keras_serve.storage.uploads import is_upload_id
from keras_serve.web.admin_auth import AdminAuth
from keras_serve.web.openapi import ERROR, binary, form_body, html_page, operation
from keras_serve.web.openapi import json_body as json_answer  # json_body() here reads a request's
from keras_serve.web.responses import wants_html


OBJECT: dict = {"type": "object"}
LOGIN_FORM: dict = {"type": "object", "required": ["token", "csrf_token"],
                    "properties": {"token": {"type": "string"}, "name": {"type": "string"},
                                   "csrf_token": {"type": "string"},
                                   "next": {"type": "string", "description": "where to go after logging in: a path "
                                            "on this server (/admin); anything else is ignored"}}}
REVIEW_BODY: dict = {"type": "object", "properties": {"label": {"type": "string"}, "confirm": {"type": "boolean"}}}
BULK_REVIEW_BODY: dict = {"type": "object", "required": ["reviews"],
                          "properties": {"reviews": {"type": "array", "minItems": 1, "maxItems": 200,
                                                     "items": {"type": "object", "required": ["id"],
                                                               "properties": {"id": {"type": "string"},
                                                                              "label": {"type": "string"},
                                                                              "confirm": {"type": "boolean"}}}}}}

bp = Blueprint("review", __name__)

# The review page runs one script of ours and fetches our own API; nothing else is allowed.
REVIEW_CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
              "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
MAX_CURSOR = 512
MAX_BULK = MAX_PAGE
PUBLIC_ENDPOINTS = {"review.login_form", "review.login"}
MAX_NEXT = 512


def safe_next(value: str | None) -> str | None:
    """`value` if it is a path on this server ("/admin?window=all"), else None.

    The login redirects there, so anything that could leave the site is refused: an absolute
    URL, a scheme-relative "//host", a backslash (browsers read "/\\host" as "//host"),
    control characters, anything not starting with one "/".
    """
    if not value or len(value) > MAX_NEXT or not value.startswith("/") or value.startswith("//"):
        return None
    if "\\" in value or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


def _next_of_this_request() -> str | None:
    """This page, for the login to send the browser back to; None for the review page (where a
    login goes anyway)."""
    if request.path == url_for("review.review_page") and not request.query_string:
        return None
    return safe_next(request.full_path if request.query_string else request.path)


def auth() -> AdminAuth:
    return current_app.extensions["admin_auth"]


def review_store() -> ReviewStore:
    return current_app.extensions["review_store"]


def labels() -> list[str]:
    return [*current_app.extensions["classifier"].model.labels, NEITHER]


@bp.before_request
def require_admin():
    if "admin_auth" not in current_app.extensions:
        abort(404)  # review is off: nothing here exists
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    reviewer = auth().authenticate()
    if reviewer is None:
        if request.method == "GET" and wants_html():
            # back here after the login (only ever a path on this server)
            return redirect(url_for("review.login_form", next=_next_of_this_request()), 303)
        raise NotAuthorizedError("This needs the admin credential.")
    g.reviewer = reviewer
    return None


@bp.after_request
def private(response: Response) -> Response:
    response.headers["Cache-Control"] = response.headers.get("Cache-Control", "no-store")
    response.headers["Content-Security-Policy"] = REVIEW_CSP
    response.vary.add("Cookie")
    response.vary.add("Authorization")
    return response


# --- log in and out -----------------------------------------------------------------------

@bp.get("/review/login")
@operation("The reviewer's login form (404 while review is off)", tags=["review"],
           responses={200: html_page(), 404: ERROR})
def login_form():
    return render_template("review_login.html", csrf_token=generate_csrf(), message=None,
                           next_path=safe_next(request.args.get("next")))


@bp.post("/review/login")
@operation("Log a reviewer in: token and name from the form (CSRF token required); a session cookie",
           tags=["review"], request=form_body(LOGIN_FORM),
           responses={303: html_page(), 400: ERROR, 401: html_page(), 403: ERROR, 404: ERROR, 429: ERROR})
def login():
    auth().check_same_origin()
    auth().csrf.protect()
    next_path = safe_next(request.form.get("next"))
    if auth().log_in(request.form.get("token", ""), request.form.get("name")):
        return redirect(next_path or url_for("review.review_page"), 303)
    return render_template("review_login.html", csrf_token=generate_csrf(), next_path=next_path,
                           message="That token is not right."), 401


@bp.post("/review/logout")
@operation("Log the reviewer out", tags=["review"], responses={303: html_page(), 401: ERROR, 404: ERROR})
def logout():
    auth().log_out()  # the session ends server-side: a copy of the cookie is refused from now on
    return redirect(url_for("review.login_form"), 303)


# --- the listing --------------------------------------------------------------------------

def cursor_serializer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.secret_key, salt="keras-serve listing cursor")


def encode_cursor(order: str, after: tuple[Any, ...]) -> str:
    values = [value.isoformat() if isinstance(value, datetime) else value for value in after]
    return cursor_serializer().dumps({"o": order, "k": values})


def decode_cursor(text: str, order_name: str) -> tuple[Any, ...]:
    """The sort key a cursor carries; anything not made by `encode_cursor` for this order is a 400."""
    bad = ReviewRequestError("That cursor is not valid here.",
                             "Use next_cursor exactly as a listing gave it, with the same order.")
    if len(text) > MAX_CURSOR:
        raise bad
    try:
        payload = cursor_serializer().loads(text)
    except (BadData, ValueError, TypeError, UnicodeError):
        raise bad from None
    order = ORDERS[order_name]
    if not isinstance(payload, dict) or payload.get("o") != order_name or not isinstance(payload.get("k"), list) \
            or len(payload["k"]) != len(order.kinds):
        raise bad
    key = []
    for value, kind in zip(payload["k"], order.kinds):
        try:
            if kind is datetime:
                key.append(datetime.fromisoformat(value))
            elif kind is float:
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError
                key.append(float(value))
            elif isinstance(value, str) and is_upload_id(value):
                key.append(value)
            else:
                raise ValueError
        except (ValueError, TypeError):
            raise bad from None
    return tuple(key)


def _yes_no(name: str) -> bool | None:
    value = request.args.get(name, "").strip().lower()
    if value in ("", "any"):
        return None
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    raise ReviewRequestError(f"{name} must be yes or no.")


def _number(name: str, low: float, high: float) -> float | None:
    text = request.args.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (low <= value <= high):
        raise ReviewRequestError(f"{name} must be a number from {low:g} to {high:g}.")
    return value


def _date(name: str) -> datetime | None:
    text = request.args.get(name, "").strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReviewRequestError(f"{name} must be a date or time such as 2026-12-01 or 2026-12-01T08:00Z.") from None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _text(name: str, longest: int = 64) -> str | None:
    text = request.args.get(name, "").strip()
    if not text:
        return None
    if len(text) > longest:
        raise ReviewRequestError(f"{name} is too long.")
    return text


def listing_query() -> ListingQuery:
    order = request.args.get("order", "newest") or "newest"
    if order not in ORDERS:
        raise ReviewRequestError(f"order must be one of: {', '.join(ORDERS)}.")
    feedback = request.args.get("feedback", "").strip() or None
    if feedback not in (None, "any", "disagrees"):
        raise ReviewRequestError("feedback must be any or disagrees.")
    limit_text = request.args.get("limit", "").strip()
    if limit_text and not (limit_text.isdigit() and 1 <= int(limit_text) <= MAX_PAGE):
        raise ReviewRequestError(f"limit must be a whole number from 1 to {MAX_PAGE}.")
    cursor = request.args.get("cursor", "").strip()
    return ListingQuery(
        order=order, label=_text("label"), min_confidence=_number("min_confidence", 0, 1),
        max_confidence=_number("max_confidence", 0, 1), since=_date("since"), until=_date("until"),
        reviewed=_yes_no("reviewed"), corrected=_yes_no("corrected"), model=_text("model", 255),
        feedback=feedback, limit=int(limit_text) if limit_text else DEFAULT_PAGE,
        after=decode_cursor(cursor, order) if cursor else None)


def listing() -> dict[str, Any]:
    query = listing_query()
    rows, after = review_store().page(query)
    uploads = []
    # Built by hand, not url_for: 96 url_for calls were a third of a page's time, and an id
    # from the store is plain hex (the listing's rows are ids the store made or checked).
    root = request.script_root
    for row in rows:
        item = listed_upload(row)
        item["image_url"] = f"{root}/uploads/{row['id']}"
        item["thumbnail_url"] = f"{root}/api/uploads/{row['id']}/thumbnail"
        uploads.append(item)
    return {"uploads": uploads, "order": query.order,
            "next_cursor": encode_cursor(query.order, after) if after else None}


@bp.get("/api/uploads")
@operation("Uploads for review, newest first by default, filtered, keyset-paginated (admin)", tags=["review"],
           responses={200: json_answer(OBJECT), 400: ERROR, 401: ERROR, 404: ERROR, 503: ERROR})
def list_uploads():
    return jsonify(listing())


@bp.get("/api/uploads/counts")
@operation("How many uploads, reviewed, corrected (admin)", tags=["review"],
           responses={200: json_answer(OBJECT), 401: ERROR, 404: ERROR, 503: ERROR})
def counts():
    return jsonify(review_store().counts())


@bp.get("/api/uploads/<upload_id>/thumbnail")
@operation("A 256 px WebP thumbnail of an upload, made once (admin)", tags=["review"],
           responses={200: binary("image/webp"), 401: ERROR, 404: ERROR, 503: ERROR})
def thumbnail(upload_id: str):
    data = current_app.extensions["thumbnails"].get(upload_id)
    return Response(data, mimetype="image/webp", headers={"Cache-Control": "private, max-age=86400"})


@bp.get("/api/uploads/<upload_id>/reviews")
@operation("Every review of an upload, oldest first; the latest counts (admin)", tags=["review"],
           responses={200: json_answer(OBJECT), 401: ERROR, 404: ERROR, 503: ERROR})
def history(upload_id: str):
    if not is_upload_id(upload_id):
        raise UploadNotFound("That is not an upload id.")
    reviews = review_store().history(upload_id)
    for review in reviews:
        review["created"] = review["created"].replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")
    return jsonify({"id": upload_id, "reviews": reviews})


# --- corrections --------------------------------------------------------------------------

def decision(item: Any) -> tuple[str, str | None]:
    """(upload id, label or None for "confirm") from one JSON object; a 400 if it is neither."""
    if not isinstance(item, dict):
        raise ReviewRequestError("Each review is a JSON object.")
    upload_id = item.get("id")
    if not isinstance(upload_id, str) or not is_upload_id(upload_id):
        raise ReviewRequestError("Each review needs the id of an upload.")
    if item.get("confirm") is True and "label" not in item:
        return upload_id, None
    label = item.get("label")
    if label not in labels():
        raise ReviewRequestError(f"label must be one of: {', '.join(labels())}, or send \"confirm\": true.")
    return upload_id, label


def json_body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise ReviewRequestError("Send a JSON body (Content-Type: application/json).")
    return body


@bp.post("/api/uploads/<upload_id>/review")
@operation("Confirm an upload's prediction or set its true label, 'neither' included (admin)", tags=["review"],
           request=json_answer(REVIEW_BODY),
           responses={200: json_answer(OBJECT), 400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR, 503: ERROR})
def review_one(upload_id: str):
    body = json_body()
    upload_id, label = decision({**body, "id": upload_id} if isinstance(body, dict) else body)
    result = review_store().review([(upload_id, label)], g.reviewer)
    if result["not_found"]:
        raise UploadNotFound(f"No upload with id {upload_id}.")
    if not result["reviewed"]:
        raise ReviewRequestError("This upload has no prediction to confirm; send the label instead.")
    return jsonify({**result["reviewed"][0], "counts": review_store().counts()})


@bp.post("/api/uploads/review")
@operation("Review up to 200 uploads at once (admin); a confirm leaves uploads that already have a review "
           "as they are (listed in already_reviewed)", tags=["review"], request=json_answer(BULK_REVIEW_BODY),
           responses={200: json_answer(OBJECT), 400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR, 503: ERROR})
def review_many():
    body = json_body()
    items = body.get("reviews") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BULK:
        raise ReviewRequestError(f"Send {{\"reviews\": [...]}} with 1 to {MAX_BULK} reviews.")
    # A confirm here is a bulk action: it never replaces a decision someone already made.
    result = review_store().review([decision(item) for item in items], g.reviewer, confirm_unreviewed_only=True)
    return jsonify({**result, "counts": review_store().counts()})


# --- the page -----------------------------------------------------------------------------

@bp.get("/review")
@operation("The reviewer's page (admin; browsers without a session are sent to the login form)",
           tags=["review"], responses={200: html_page(), 303: html_page(), 400: ERROR, 401: ERROR, 404: ERROR,
                                      503: ERROR})
def review_page():
    page = listing()
    return render_template("review.html", page=page, counts=review_store().counts(), labels=labels(),
                           orders=list(ORDERS), models=review_store().models(), args=request.args,
                           reviewer=g.reviewer, csrf_token=generate_csrf(), neither=NEITHER)


def init_app(app, store) -> None:
    """Review on (with the admin token) or off (its routes 404); registered either way."""
    from keras_serve.web.admin_auth import admin_token

    token = admin_token(app.config)
    app.register_blueprint(bp)
    app.extensions["review_store"] = ReviewStore(store.records)
    # Made with review off too: the upload page shows the server's thumbnail of a HEIC photo.
    thumbnails = ThumbnailCache(store, store_thumbnail_folder(app.config))
    store.on_deleted.append(thumbnails.forget)
    app.extensions["thumbnails"] = thumbnails
    if token is None:
        return
    AdminAuth(token).init_app(app, token, float(app.config["ADMIN_SESSION_HOURS"]))


def store_thumbnail_folder(config) -> str:
    from pathlib import Path

    return str(Path(config["UPLOAD_DIR"]) / ".thumbnails")
