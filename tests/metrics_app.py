"""A Flask app with only the metrics hooks, for serving under real gunicorn workers in tests
(no model: what is tested is the counting across processes)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from flask import Flask

from keras_serve.web import metrics


def create() -> Flask:
    app = Flask("metrics-app")
    def pid() -> str:
        time.sleep(0.2)  # keeps this (sync) worker busy, so requests sent meanwhile go to the other
        return str(os.getpid())

    app.add_url_rule("/pid", "pid", pid)

    def slow() -> str:
        Path(os.environ["SLOW_PID_FILE"]).write_text(str(os.getpid()))
        time.sleep(60)
        return "late"

    app.add_url_rule("/slow", "slow", slow)
    metrics.init_app(app)
    return app
