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
    """Build the app and load the model once; raises ModelLoadError if it cannot be served,
    ConfigurationError if a setting is unusable.

    `config["MODEL"]` may be a ready model object (tests); then MODEL_PATH is not read.
    """
    # Imported here, not at the top: `python -m keras_serve.settings` (the settings table)
    # would otherwise find its own module already imported by this package and warn.
    from keras_serve import settings
    from keras_serve.web import (access, dashboard, metrics, model_admin, multipart_form, openapi, request_log,
                                 responses, review, routes)

    app = Flask(__name__, template_folder=str(settings.PROJECT_ROOT / "templates"),
                static_folder=str(settings.PROJECT_ROOT / "static"))
    app.request_class = multipart_form.ServingRequest  # python-multipart for uploads
    app.config.from_mapping({"MODEL": None, **settings.resolve(config)})
    request_log.init_app(app)  # first: the request id and the clock start before any other hook
    access.AccessSettings.from_config(app.config)  # a bad token file or limit fails before the model loads

    from keras_serve.pipeline.service import ClassifierService

    service = ClassifierService.from_config(app.config, metrics=metrics.init_app(app))
    app.extensions["classifier"] = service
    app.register_blueprint(routes.bp)
    try:
        review.init_app(app, service.store)  # /review and /api/uploads: on with ADMIN_TOKEN, else 404
        model_admin.init_app(app, service.store)  # /api/models: promote and roll back, as review
        dashboard.init_app(app)  # /admin and /api/stats: live model quality, as review
    except BaseException:
        service.close()
        raise
    responses.init_app(app)
    access.init_app(app)  # after the metrics hooks: refused requests are counted too
    openapi.init_app(app)  # after every route: /openapi.json describes them all
    service.ready = True
    return app
