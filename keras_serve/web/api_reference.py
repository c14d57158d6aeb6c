"""The API reference page's renderer: Swagger UI, served by this app from an installed package.

Swagger UI's built files come from the `flask-swagger-ui` wheel (pinned in requirements.txt),
which ships them; only its files are used, not its blueprint (whose page has an inline script
that the CSP refuses). So /docs works offline, with no CDN: the page is static/api-reference.html,
its start-up script static/api-reference.js, and the two Swagger UI files are answered here.
"""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from flask import Response, abort, send_from_directory

# The only files answered: a name from the URL never reaches the file system unless it is one of these.
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
# Swagger UI's CSS draws its icons as data: SVG images; React sets element styles through the
# DOM (not inline style attributes), which style-src 'self' allows. Nothing inline, nothing remote.
API_REFERENCE_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
                     "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# The files change only with the pinned package: a day in the browser's cache is safe.
ASSET_CACHE_CONTROL = "public, max-age=86400"


def swagger_ui_folder() -> Path:
    import flask_swagger_ui

    return Path(flask_swagger_ui.__file__).resolve().parent / "dist"


def swagger_ui_version() -> str:
    return version("flask-swagger-ui")  # the package follows Swagger UI's own version numbers


def send_asset(name: str) -> Response:
    """One of Swagger UI's files, or 404."""
    if name not in ASSETS:
        abort(404)
    response = send_from_directory(swagger_ui_folder(), name, mimetype=ASSETS[name], max_age=86400)
    response.headers["Cache-Control"] = ASSET_CACHE_CONTROL
    return response
