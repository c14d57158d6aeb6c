"""Serve a Keras image classifier: an upload form for people, POST /file/ for programs.

`create_app(config)` builds the Flask app around one loaded model (flaskr style); settings
come from `keras_serve.settings` defaults, then KERAS_SERVE_* environment variables, then
`config`. `keras_serve.cli` is the command line (`python app.py`).
"""
from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the logs

from flask import Flask


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app and load the model once; raises ModelLoadError if it cannot be served.

    `config["MODEL"]` may be a ready model object (tests); then MODEL_PATH is not read.
    """
    # Imported here, not at the top: `python -m keras_serve.settings` (the settings table)
    # would otherwise find its own module already imported by this package and warn.
    from keras_serve import settings
    from keras_serve.web import metrics, multipart_form, responses, review, routes

    app = Flask(__name__, template_folder=str(settings.PROJECT_ROOT / "templates"),
                static_folder=str(settings.PROJECT_ROOT / "static"))
    app.request_class = multipart_form.ServingRequest  # python-multipart for uploads
    app.config.from_mapping({"MODEL": None, **settings.resolve(config)})

    from keras_serve.pipeline.service import ClassifierService

    service = ClassifierService.from_config(app.config, metrics=metrics.init_app(app))
    app.extensions["classifier"] = service
    app.register_blueprint(routes.bp)
    try:
        review.init_app(app, service.store)  # /review and /api/uploads: on with ADMIN_TOKEN, else 404
    except BaseException:
        service.close()
        raise
    responses.init_app(app)
    service.ready = True
    return app
