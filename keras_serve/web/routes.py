"""HTTP routes: the upload form, the classify endpoint, stored images and heatmaps, health."""
from __future__ import annotations

import unicodedata

from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for

from keras_serve.errors import MissingFileError, ServiceError, TooManyFilesError
from keras_serve.pipeline.service import ClassifiedUpload, ClassifierService
from keras_serve.web.responses import service_error_body, service_error_status, wants_html

bp = Blueprint("web", __name__)

# An upload and its heatmap never change (a new model file changes the heatmap's ETag), so the
# browser may keep them; "private" keeps them out of shared caches.
IMMUTABLE_PRIVATE = "private, max-age=3600"


def service() -> ClassifierService:
    return current_app.extensions["classifier"]


@bp.get("/")
def index():
    # The page's limits reach its script as data- attributes (the CSP allows no inline script).
    return render_template("index.html", model=service().model.describe(),
                           max_files=current_app.config["MAX_FILES_PER_REQUEST"],
                           max_upload_bytes=current_app.config["MAX_CONTENT_LENGTH"])


def result_json(result: ClassifiedUpload) -> dict:
    """What POST /file/ answers for one classified image."""
    return {**result.prediction.as_json(), "id": result.upload_id,
            "image_url": url_for("web.uploaded_image", upload_id=result.upload_id),
            "milliseconds": round(result.milliseconds, 2)}


def display_filename(name: str | None) -> str | None:
    """A client's file name fit to show back: its last path segment, no control or format
    characters, at most 255 characters; None if nothing is left. Never used as a path."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:255] or None


# "/file" is its own rule, not a redirect to "/file/" (curl would drop the POST body), and not
# strict_slashes=False either, with which GET /file is a 404 instead of a 405.
@bp.post("/file")
@bp.post("/file/")
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
    if wants_html():
        return render_template("result.html", prediction=result.prediction,
                               image_url=url_for("web.uploaded_image", upload_id=result.upload_id),
                               upload_id=result.upload_id)
    return jsonify(result_json(result))


def classify_several(uploads) -> tuple[Response | str, int]:
    """{"results": [...]} in the order sent; 200 if any image was classified, else the first error's status."""
    answers = service().classify_many([(u.read(), u.filename) for u in uploads])
    items = []
    for upload, answer in zip(uploads, answers):
        if isinstance(answer, ServiceError):
            items.append({"error": service_error_body(answer), "filename": display_filename(upload.filename)})
        else:
            items.append(result_json(answer))
    errors = [a for a in answers if isinstance(a, ServiceError)]
    status = 200 if len(errors) < len(answers) else service_error_status(errors[0])
    if wants_html():
        return render_template("results.html", items=items), status
    return jsonify({"results": items}), status


@bp.get("/uploads/<upload_id>")
def uploaded_image(upload_id: str):
    data, mimetype = service().read_image(upload_id)
    return Response(data, mimetype=mimetype, headers={"Cache-Control": IMMUTABLE_PRIVATE})


@bp.get("/uploads/<upload_id>/heatmap.png")
def upload_heatmap(upload_id: str):
    """Grad-CAM of the stored upload: a transparent PNG to lay over the photo (docs/heatmap.md)."""
    etag = service().heatmap_etag(upload_id)  # 404 for an unknown id
    headers = {"Cache-Control": IMMUTABLE_PRIVATE, "ETag": f'"{etag}"'}
    if request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    return Response(service().heatmap(upload_id), mimetype="image/png", headers=headers)


@bp.get("/uploads/<upload_id>/record")
def upload_record(upload_id: str):
    return jsonify(service().read_record(upload_id))


@bp.get("/model")
def model_description():
    # unsure_below: a winning score under it is answered "unsure": true (0: never).
    return jsonify({**service().model.describe(), "unsure_below": service().unsure_below})


@bp.get("/healthz")
def healthz():
    return jsonify({"alive": True})


@bp.get("/readyz")
def readyz():
    status = service().status()
    status["storage"] = service().store.health()
    status["ready"] = status["ready"] and status["storage"]["ok"]
    return jsonify(status), 200 if status["ready"] else 503
