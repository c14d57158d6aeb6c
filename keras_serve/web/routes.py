"""HTTP routes: the upload form, the classify endpoint, stored images, health."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for

from keras_serve.pipeline.service import ClassifierService
from keras_serve.errors import MissingFileError
from keras_serve.web.responses import wants_html

bp = Blueprint("web", __name__)


def service() -> ClassifierService:
    return current_app.extensions["classifier"]


@bp.get("/")
def index():
    # The page's limits reach its script as data- attributes (the CSP allows no inline script).
    return render_template("index.html", model=service().model.describe(),
                           max_files=current_app.config["MAX_FILES_PER_REQUEST"],
                           max_upload_bytes=current_app.config["MAX_CONTENT_LENGTH"])


# "/file" is its own rule, not a redirect to "/file/" (curl would drop the POST body), and not
# strict_slashes=False either, with which GET /file is a 404 instead of a 405.
@bp.post("/file")
@bp.post("/file/")
def classify():
    upload = request.files.get("file")
    if upload is None:
        raise MissingFileError("The request has no file part named 'file'.")
    result = service().classify(upload.read(), upload.filename)  # preprocess rejects empty files
    image_url = url_for("web.uploaded_image", upload_id=result.upload_id)
    if wants_html():
        return render_template("result.html", prediction=result.prediction, image_url=image_url,
                               upload_id=result.upload_id)
    return jsonify({**result.prediction.as_json(), "id": result.upload_id, "image_url": image_url,
                    "milliseconds": round(result.milliseconds, 2)})


@bp.get("/uploads/<upload_id>")
def uploaded_image(upload_id: str):
    data, mimetype = service().read_image(upload_id)
    # An upload never changes, so the browser may keep it; "private" keeps it out of shared caches.
    return Response(data, mimetype=mimetype, headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/uploads/<upload_id>/record")
def upload_record(upload_id: str):
    return jsonify(service().read_record(upload_id))


@bp.get("/model")
def model_description():
    return jsonify(service().model.describe())


@bp.get("/healthz")
def healthz():
    return jsonify({"alive": True})


@bp.get("/readyz")
def readyz():
    status = service().status()
    status["storage"] = service().store.health()
    status["ready"] = status["ready"] and status["storage"]["ok"]
    return jsonify(status), 200 if status["ready"] else 503
