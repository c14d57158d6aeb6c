"""HTTP routes: the upload form, the classify endpoint, stored images and heatmaps, health."""
from __future__ import annotations

import hashlib
import hmac
import unicodedata

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request, url_for

from keras_serve.errors import (MissingFileError, NotAuthorizedError, ReviewRequestError, ServiceError,
                                TooManyFilesError, UploadNotFound)
from keras_serve.pipeline.service import ClassifiedUpload, ClassifierService
from keras_serve.storage.records import NEITHER
from keras_serve.storage.uploads import is_upload_id
from keras_serve.web.admin_auth import same_origin
from keras_serve.web.api_models import (CLASSIFY_ENCODING, CLASSIFY_FORM, CLASSIFY_ANSWER, ClassificationList,
                                        Liveness, ModelDescription, Readiness, UploadRecord)
from keras_serve.web.api_reference import API_REFERENCE_CSP, send_asset
from keras_serve.web.openapi import (ERROR, Body, binary, error_or, form_body, html_page, json_body, multipart,
                                     operation)
from keras_serve.web.proxies import client_address
from keras_serve.web.request_log import current_request_id
from keras_serve.web.responses import service_error_body, service_error_status, wants_html

bp = Blueprint("web", __name__)

FEEDBACK_FORM: dict = {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}
FEEDBACK_ANSWER: dict = {"type": "object", "required": ["id", "label", "agrees", "stored"],
                         "properties": {"id": {"type": "string"}, "label": {"type": "string"},
                                        "agrees": {"type": ["boolean", "null"]}, "stored": {"type": "boolean"}}}

# An upload and its heatmap never change (a new model file changes the heatmap's ETag), so the
# browser may keep them; "private" keeps them out of shared caches.
IMMUTABLE_PRIVATE = "private, max-age=3600"


def service() -> ClassifierService:
    return current_app.extensions["classifier"]


@bp.get("/")
@operation("The upload form (a page for people)", tags=["pages"], responses={200: html_page()})
def index():
    # The page's limits reach its script as data- attributes (the CSP allows no inline script).
    model = service().model.describe()
    return render_template("index.html", model=model, neither=NEITHER,
                           max_files=current_app.config["MAX_FILES_PER_REQUEST"],
                           max_upload_bytes=current_app.config["MAX_CONTENT_LENGTH"],
                           public_url=display_url_root(), examples=examples_for(model["labels"]))


# Drawings in static/examples/ (keras_serve/tools/example_photos.py) for a first try; offered
# only to a model that tells cats from dogs, where they make sense.
EXAMPLES = [("cat.jpg", "Example: a drawing of a cat"), ("dog.jpg", "Example: a drawing of a dog"),
            ("mug.jpg", "Example: a drawing of a mug")]


def examples_for(labels: list[str]) -> list[tuple[str, str]]:
    return EXAMPLES if {"cat", "dog"} <= {str(label).lower() for label in labels} else []


def display_url_root() -> str:
    """This request's scheme and host, for the page's curl example. The Host header is the
    client's text: shown only, never used for a link or a redirect. Werkzeug empties a host with
    characters no host has; the template escapes what is left all the same."""
    if not request.host:
        return "http://YOUR-SERVER"
    root = request.host_url.rstrip("/")
    return "".join(c for c in root if c.isprintable())[:200]


def result_json(result: ClassifiedUpload) -> dict:
    """What POST /file/ answers for one classified image."""
    return {**result.prediction.as_json(), "id": result.upload_id,
            "image_url": url_for("web.uploaded_image", upload_id=result.upload_id),
            "milliseconds": round(result.milliseconds, 2), "model_version": result.model_sha256}


def display_filename(name: str | None) -> str | None:
    """A client's file name fit to show back: its last path segment, no control or format
    characters, at most 255 characters; None if nothing is left. Never used as a path."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:255] or None


SEVERAL_OR_ERROR = error_or(ClassificationList)


# "/file" is its own rule, not a redirect to "/file/" (curl would drop the POST body), and not
# strict_slashes=False either, with which GET /file is a 404 instead of a 405.
@bp.post("/file")
@bp.post("/file/")
@operation(
    "Classify an image", tags=["classify"],
    description="Send the image as multipart/form-data in a field named `file`; repeat the field to send "
                "several. The upload is stored before it is answered. Browsers (Accept: text/html first) get "
                "the result page. `POST /file` (no slash) is the same operation.\n\n"
                "```sh\ncurl -F file=@cat.jpg http://localhost:8080/file/\n"
                "curl -F file=@cat.jpg -F file=@dog.png http://localhost:8080/file/\n"
                "curl -H \"Authorization: Bearer $TOKEN\" -F file=@cat.jpg http://localhost:8080/file/  "
                "# with API tokens on\n```",
    request=multipart(CLASSIFY_FORM), encoding=CLASSIFY_ENCODING, operation_id="classify",
    # Several files, all refused: {"results": [...]} under the first one's status.
    responses={200: [json_body(CLASSIFY_ANSWER), html_page()], 400: SEVERAL_OR_ERROR, 401: ERROR,
               413: SEVERAL_OR_ERROR, 415: SEVERAL_OR_ERROR, 422: SEVERAL_OR_ERROR, 429: ERROR,
               503: SEVERAL_OR_ERROR},
    response_headers={401: {"WWW-Authenticate": {"type": "string"}},
                      429: {"Retry-After": {"type": "string", "pattern": "^[0-9]+$"}}},
    links={200: {"UploadRecord": {"operationId": "getUploadRecord",
                                  "parameters": {"upload_id": "$response.body#/id"}},
                 "UploadImage": {"operationId": "getUploadedImage",
                                 "parameters": {"upload_id": "$response.body#/id"}}}},
)
def classify():
    uploads = request.files.getlist("file")
    if not uploads:
        raise MissingFileError("The request has no file part named 'file'.")
    if len(uploads) == 1:  # the answer to one file is exactly what it has always been
        return classify_one(uploads[0])
    limit = int(current_app.config["MAX_FILES_PER_REQUEST"])
    if len(uploads) > limit:
        raise TooManyFilesError(f"The request has {len(uploads)} files; at most {limit} are accepted per request.")
    return classify_several(uploads)


def classify_one(upload) -> Response:
    result = service().classify(upload.read(), upload.filename)  # preprocess rejects empty files
    g.upload_id = result.upload_id  # for the request's log line
    if wants_html():
        return render_template("result.html", prediction=result.prediction,
                               image_url=url_for("web.uploaded_image", upload_id=result.upload_id),
                               upload_id=result.upload_id, labels=service().model.labels, neither=NEITHER)
    return jsonify(result_json(result))


def classify_several(uploads) -> tuple[Response | str, int]:
    """{"results": [...]} in the order sent; 200 if any image was classified, else the first error's status."""
    answers = service().classify_many([(u.read(), u.filename) for u in uploads])
    items = []
    for upload, answer in zip(uploads, answers):
        if isinstance(answer, ServiceError):
            error = {**service_error_body(answer), "request_id": current_request_id()}
            items.append({"error": error, "filename": display_filename(upload.filename)})
        else:
            items.append({**result_json(answer), "filename": display_filename(upload.filename)})
    errors = [a for a in answers if isinstance(a, ServiceError)]
    status = 200 if len(errors) < len(answers) else service_error_status(errors[0])
    if status != 200:
        g.error_code = items[0]["error"]["code"]  # for the request's log line, as a single error's
    if wants_html():
        return render_template("results.html", items=items), status
    return jsonify({"results": items}), status


@bp.get("/uploads/<upload_id>")
@operation("An uploaded image, as it was sent", tags=["uploads"],
           # octet-stream: an image whose format the server could not name (kept with an error record).
           responses={200: [binary("image/*"), binary("application/octet-stream")], 404: ERROR, 503: ERROR},
           response_headers={200: {"Cache-Control": {"type": "string"}}})
def uploaded_image(upload_id: str):
    data, mimetype = service().read_image(upload_id)
    return Response(data, mimetype=mimetype, headers={"Cache-Control": IMMUTABLE_PRIVATE})


@bp.get("/uploads/<upload_id>/heatmap.png")
@operation("Where the model looked (Grad-CAM): a transparent PNG to lay over the stored image", tags=["uploads"],
           responses={200: binary("image/png"), 304: binary("image/png"), 401: ERROR, 404: ERROR, 422: ERROR,
                      429: ERROR, 503: ERROR},
           response_headers={200: {"ETag": {"type": "string"}}, 401: {"WWW-Authenticate": {"type": "string"}},
                             429: {"Retry-After": {"type": "string", "pattern": "^[0-9]+$"}}})
def upload_heatmap(upload_id: str):
    """Grad-CAM of the stored upload: a transparent PNG to lay over the photo (docs/heatmap.md).

    It runs the model, so API tokens and the rate limit apply as to POST /file/ (web/access.py)."""
    etag = service().heatmap_etag(upload_id)  # 404 for an unknown id
    headers = {"Cache-Control": IMMUTABLE_PRIVATE, "ETag": f'"{etag}"'}
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    return Response(service().heatmap(upload_id), mimetype="image/png", headers=headers)


@bp.get("/uploads/<upload_id>/thumbnail.webp")
@operation("A small preview of an upload (WebP, at most 256 px), for formats a browser cannot draw such as HEIC",
           tags=["uploads"], responses={200: binary("image/webp"), 404: ERROR, 503: ERROR},
           response_headers={200: {"Cache-Control": {"type": "string"}}})
def upload_thumbnail(upload_id: str):
    # Made once per upload, at most two at a time (storage/thumbnails.py); an undecodable one is a 404.
    data = current_app.extensions["thumbnails"].get(upload_id)
    return Response(data, mimetype="image/webp", headers={"Cache-Control": IMMUTABLE_PRIVATE})


@bp.get("/uploads/<upload_id>/record")
@operation("The stored record of an upload: what arrived, when, and the answer", tags=["uploads"],
           responses={200: json_body(UploadRecord), 404: ERROR, 503: ERROR})
def upload_record(upload_id: str):
    return jsonify(service().read_record(upload_id))


@bp.post("/uploads/<upload_id>/feedback")
@operation("\"Was this right?\" from the result page: a visitor's label, stored as unverified feedback",
           tags=["uploads"], request=form_body(FEEDBACK_FORM),
           responses={200: [json_body(FEEDBACK_ANSWER), html_page()], 400: ERROR, 401: ERROR, 404: ERROR,
                      429: ERROR, 503: ERROR},
           response_headers={429: {"Retry-After": {"type": "string", "pattern": "^[0-9]+$"}}})
def feedback(upload_id: str):
    """"Was this right?" from the result page: unverified, one visitor's word, kept apart from reviews.

    No login, so no CSRF token either: what keeps other sites from posting here is the browser's
    Origin / Sec-Fetch-Site (refused when cross-site) and the upload id itself (128 random bits
    that only its uploader was shown). Each client address may send FEEDBACK_PER_HOUR answers
    an hour, counted in the database under a keyed hash of the address, never the address.
    """
    if not same_origin():
        raise NotAuthorizedError("Feedback is only taken from this site's own result page.",
                                 "Use the buttons under the result.")
    if not is_upload_id(upload_id):
        raise UploadNotFound("That is not an upload id.")
    label = request.form.get("label") or (request.get_json(silent=True) or {}).get("label")
    allowed = [*service().model.labels, NEITHER]
    if label not in allowed:
        raise ReviewRequestError(f"label must be one of: {', '.join(allowed)}.",
                                 "Send the label you see in the picture as the form field 'label'.")
    reviews = current_app.extensions["review_store"]
    salt = reviews.instance_secret("feedback-client-key")
    # The same client as the rate limit's: a trusted proxy's X-Forwarded-For, an IPv6 client per /64.
    client = hmac.new(salt.encode(), client_address().encode(), hashlib.sha256).hexdigest()[:32]
    agrees = reviews.add_feedback(upload_id, label, client, int(current_app.config["FEEDBACK_PER_HOUR"]))
    if wants_html():
        return render_template("feedback.html", agrees=agrees, label=label, neither=NEITHER)
    return jsonify({"id": upload_id, "label": label, "agrees": agrees, "stored": True})


@bp.get("/model")
@operation("The loaded model's serving contract: input, preprocessing, labels, engine", tags=["model"],
           responses={200: json_body(ModelDescription)})
def model_description():
    # unsure_below: a winning score under it is answered "unsure": true (0: never).
    follower = service().follower
    return jsonify({**service().model.describe(), "unsure_below": service().unsure_below,
                    "versions": follower.describe() if follower is not None else None})


# Both answer from state already in memory and never wait on the model or the store, so
# they are safe to answer outside the request threads (web/server.py does, for waitress).
@bp.get("/healthz")
@operation("Liveness: the process answers", tags=["operations"], responses={200: json_body(Liveness)})
def healthz():
    return jsonify({"alive": True})


@bp.get("/readyz")
@operation("Readiness: the model serves and the storage answers (503 while not, and from SIGTERM on)",
           tags=["operations"], responses={200: json_body(Readiness), 503: json_body(Readiness)})
def readyz():
    # storage: ok / not ok per half, from what the uploads and the background checks last
    # found (storage/faults.py); where and why goes to the log, not to whoever asks.
    status = service().status()
    status["storage"] = service().store.health()
    status["ready"] = status["ready"] and status["storage"]["ok"]
    return jsonify(status), 200 if status["ready"] else 503


@bp.get("/docs")
@operation("The API reference: Swagger UI rendering /openapi.json, with try-it and curl", tags=["reference"],
           responses={200: html_page()})
def api_reference():
    response = current_app.send_static_file("api-reference.html")
    response.headers["Content-Security-Policy"] = API_REFERENCE_CSP
    return response


@bp.get("/docs/assets/<name>")
@operation("A file of the API reference's renderer (Swagger UI's script and style sheet)", tags=["reference"],
           path={"name": {"type": "string", "minLength": 1, "examples": ["swagger-ui-bundle.js", "swagger-ui.css"]}},
           responses={200: [Body("text/javascript", {"type": "string"}), Body("text/css", {"type": "string"})],
                      404: ERROR})
def api_reference_asset(name: str):
    return send_asset(name)
