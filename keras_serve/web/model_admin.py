"""Model versions over HTTP, for holders of the admin token (as /review; 404 while review is off).

    GET  /api/models                    the published versions, the one promoted, the log, and
                                        what this process serves
    POST /api/models                    publish a model file (multipart: model, card), checked first
    POST /api/models/<sha256>/promote   serve a published version everywhere
    POST /api/models/rollback           back to what served before the promotion in effect

Files are published here or with `python -m keras_serve.model publish|promote FILE`
(docs/model-versions.md); either way they are checked first, in a child process within a
memory and time budget, never in this one (keras_serve/model/candidate_check.py; a refused one:
422 with the reason). Over HTTP the speed and memory comparison with the served model always
applies: only the CLI's --force skips it. A promotion is checked the same way (and its stored
file against its sha256) before it is logged, then tried at once by the process that answers:
if it refuses the version, the promotion is rolled back and the answer is 422 with the reason,
so no server keeps trying it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from flask import Blueprint, current_app, g, jsonify, request

from keras_serve.errors import CandidateRefused, ModelRequestError
from keras_serve.model.versions import promote_version, publish_candidate
from keras_serve.storage.model_registry import MODEL_SUFFIXES, ModelRegistry
from keras_serve.web import review
from keras_serve.web.openapi import ERROR, multipart, operation
from keras_serve.web.openapi import json_body as json_answer

OBJECT: dict = {"type": "object"}
bp = Blueprint("models", __name__)
bp.before_request(review.require_admin)
bp.after_request(review.private)


def registry() -> ModelRegistry:
    return current_app.extensions["model_registry"]


def _serving() -> dict:
    service = current_app.extensions["classifier"]
    info = service.model.info
    return {"file": info.get("file"), "sha256": info.get("sha256"),
            "versions": service.follower.describe() if service.follower is not None else None}


@bp.get("/api/models")
@operation("Published model versions, the promoted one, the log, and what this process serves (admin)",
           tags=["models"], responses={200: json_answer(OBJECT), 401: ERROR, 404: ERROR, 503: ERROR})
def list_versions():
    promoted = registry().served()
    return jsonify({"promoted": promoted.as_json() if promoted else None,
                    "serving": _serving(),
                    "versions": [v.as_json() for v in registry().versions()],
                    "log": registry().history()})


MODEL_UPLOAD: dict = {"type": "object", "required": ["model"],
                      "properties": {"model": {"type": "string", "format": "binary",
                                               "description": "The model file: .h5, .keras, or an .onnx "
                                                              "engine file (needs its card)"},
                                     "card": {"type": "string", "format": "binary",
                                              "description": "Its model card (JSON), optional"}}}


@bp.post("/api/models")
@operation("Publish a model file: checked as every server will check it, not served yet (admin)",
           tags=["models"], request=multipart(MODEL_UPLOAD),
           responses={201: json_answer(OBJECT), 400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR, 413: ERROR,
                      422: ERROR, 503: ERROR})
def publish():
    upload = request.files.get("model")
    suffix = Path(upload.filename or "").suffix.lower() if upload is not None else ""
    if upload is None or suffix not in MODEL_SUFFIXES:
        raise ModelRequestError("The request has no model file (.h5, .keras or .onnx) in the field 'model'.")
    with tempfile.TemporaryDirectory(prefix="keras-serve-candidate-") as folder:
        # The client's file name is shown, never used as a path: the file is saved as candidate<suffix>.
        path = Path(folder) / f"candidate{suffix}"
        upload.save(path)
        card = request.files.get("card")
        if card is not None:
            card.save(path.with_suffix(".json"))
        # --trust-model-code covers the operator's own files, never one sent over HTTP.
        checked_as = {**current_app.config, "TRUST_MODEL_CODE": False}
        version = publish_candidate(registry(), path, checked_as, g.reviewer, name=upload.filename)
    return jsonify({"published": version.as_json()}), 201


@bp.post("/api/models/<sha256>/promote")
@operation("Serve a published model version in every server process (admin)", tags=["models"],
           responses={200: json_answer(OBJECT), 400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR, 422: ERROR,
                      503: ERROR})
def promote(sha256: str):
    version = promote_version(registry(), sha256, current_app.config, g.reviewer)
    follower = current_app.extensions["classifier"].follower
    if follower is not None and follower.check() == "refused":
        reason = follower.refused.get(version.sha256, "refused")
        registry().rollback(g.reviewer)
        raise CandidateRefused(f"{version.file} was refused and the promotion rolled back: {reason}")
    return jsonify({"promoted": version.as_json(), "serving": _serving()})


@bp.post("/api/models/rollback")
@operation("Serve what served before the promotion in effect (admin)", tags=["models"],
           responses={200: json_answer(OBJECT), 400: ERROR, 401: ERROR, 403: ERROR, 404: ERROR, 409: ERROR,
                      503: ERROR})
def rollback():
    now = registry().rollback(g.reviewer)
    follower = current_app.extensions["classifier"].follower
    if follower is not None:
        follower.check()
    return jsonify({"promoted": now.as_json() if now else None, "serving": _serving()})


def init_app(app, store) -> None:
    app.extensions["model_registry"] = ModelRegistry(store.records, store.images)
    app.register_blueprint(bp)
