"""HTTP routes: the upload form, the classify endpoint, stored images, health."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request, url_for

from keras_serve.pipeline.service import ClassifierService
from keras_serve.errors import MissingFileError
from keras_serve.web.api_models import (CLASSIFY_FORM, Classification, Liveness, ModelDescription, Readiness,
                                        UploadRecord)
from keras_serve.web.openapi import ERROR, binary, html_page, json_body, multipart, operation
from keras_serve.web.responses import wants_html

bp = Blueprint("web", __name__)


def service() -> ClassifierService:
    return current_app.extensions["classifier"]


@bp.get("/")
@operation("The upload form (a page for people)", tags=["pages"], responses={200: html_page()})
def index():
    return render_template("index.html", model=service().model.describe())


# "/file" is its own rule, not a redirect to "/file/" (curl would drop the POST body), and not
# strict_slashes=False either, with which GET /file is a 404 instead of a 405.
@bp.post("/file")
@bp.post("/file/")
@operation(
    "Classify an image", tags=["classify"],
    description="Send the image as multipart/form-data in a field named `file`. The upload is stored "
                "before it is answered. Browsers (Accept: text/html first) get the result page.",
    request=multipart(CLASSIFY_FORM),
    responses={200: [json_body(Classification), html_page()], 400: ERROR, 413: ERROR, 415: ERROR, 422: ERROR,
               503: ERROR},
    response_headers={503: {"Retry-After": {"type": "string", "pattern": "^[0-9]+$"}}},
    links={200: {"UploadRecord": {"operationId": "web_upload_record_get",
                                  "parameters": {"upload_id": "$response.body#/id"}},
                 "UploadImage": {"operationId": "web_uploaded_image_get",
                                 "parameters": {"upload_id": "$response.body#/id"}}}},
)
def classify():
    upload = request.files.get("file")
    if upload is None:
        raise MissingFileError("The request has no file part named 'file'.")
    result = service().classify(upload.read(), upload.filename)  # preprocess rejects empty files
    g.upload_id = result.upload_id  # for the request's log line
    image_url = url_for("web.uploaded_image", upload_id=result.upload_id)
    if wants_html():
        return render_template("result.html", prediction=result.prediction, image_url=image_url,
                               upload_id=result.upload_id)
    return jsonify({**result.prediction.as_json(), "id": result.upload_id, "image_url": image_url,
                    "milliseconds": round(result.milliseconds, 2)})


@bp.get("/uploads/<upload_id>")
@operation("An uploaded image, as it was sent", tags=["uploads"],
           # octet-stream: an image whose format the server could not name (kept with an error record).
           responses={200: [binary("image/*"), binary("application/octet-stream")], 404: ERROR, 503: ERROR},
           response_headers={200: {"Cache-Control": {"type": "string"}}})
def uploaded_image(upload_id: str):
    data, mimetype = service().read_image(upload_id)
    # An upload never changes, so the browser may keep it; "private" keeps it out of shared caches.
    return Response(data, mimetype=mimetype, headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/uploads/<upload_id>/record")
@operation("The stored record of an upload: what arrived, when, and the answer", tags=["uploads"],
           responses={200: json_body(UploadRecord), 404: ERROR, 503: ERROR})
def upload_record(upload_id: str):
    return jsonify(service().read_record(upload_id))


@bp.get("/model")
@operation("The loaded model's serving contract: input, preprocessing, labels, engine", tags=["model"],
           responses={200: json_body(ModelDescription)})
def model_description():
    return jsonify(service().model.describe())


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
@operation("The API reference, a page that renders /openapi.json", tags=["reference"],
           responses={200: html_page()})
def api_reference():
    response = current_app.send_static_file("api-reference.html")
    # The one page with a script (its own, from /static): the default policy allows none.
    response.headers["Content-Security-Policy"] = API_REFERENCE_CSP
    return response


API_REFERENCE_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
                     "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
