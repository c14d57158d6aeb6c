"""HTTP routes: the upload form, the classify endpoint, stored images, health."""
from __future__ import annotations

import hashlib
import hmac

from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for

from keras_serve.pipeline.service import ClassifierService
from keras_serve.errors import MissingFileError, NotAuthorizedError, ReviewRequestError, UploadNotFound
from keras_serve.storage.records import NEITHER
from keras_serve.storage.uploads import is_upload_id
from keras_serve.web.admin_auth import same_origin
from keras_serve.web.responses import wants_html

bp = Blueprint("web", __name__)


def service() -> ClassifierService:
    return current_app.extensions["classifier"]


@bp.get("/")
def index():
    return render_template("index.html", model=service().model.describe())


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
                               upload_id=result.upload_id, labels=service().model.labels, neither=NEITHER)
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


@bp.post("/uploads/<upload_id>/feedback")
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
    client = hmac.new(salt.encode(), (request.remote_addr or "").encode(), hashlib.sha256).hexdigest()[:32]
    agrees = reviews.add_feedback(upload_id, label, client, int(current_app.config["FEEDBACK_PER_HOUR"]))
    if wants_html():
        return render_template("feedback.html", agrees=agrees, label=label, neither=NEITHER)
    return jsonify({"id": upload_id, "label": label, "agrees": agrees, "stored": True})


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
