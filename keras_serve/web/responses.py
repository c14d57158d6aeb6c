"""The one place where errors become HTTP responses (JSON or an HTML page, by Accept).

Core code raises typed `errors.ServiceError`s; Werkzeug raises HTTPExceptions for protocol
problems (405, 413, 404). Both leave here with the right status, a message saying what was
wrong and a hint saying what to do. Nothing else escapes: unexpected exceptions are logged
with their traceback and answered with a plain 500 that reveals nothing.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from keras_serve.errors import (CorruptImageError, DecodeBusyError, EmptyImageError, FeedbackLimitError,
                                ImageTooLargeError, MissingFileError, NotAnImageError, NotAuthorizedError,
                                PredictionError, ReviewRequestError, ServiceError, StorageError,
                                TooManyAttemptsError, UploadNotFound, error_code)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    EmptyImageError: 400,
    MissingFileError: 400,
    NotAnImageError: 415,
    CorruptImageError: 422,
    ImageTooLargeError: 413,
    UploadNotFound: 404,
    PredictionError: 503,
    StorageError: 503,
    DecodeBusyError: 503,
    ReviewRequestError: 400,
    NotAuthorizedError: 401,
    TooManyAttemptsError: 429,
    FeedbackLimitError: 429,
}

HINT_BY_STATUS = {
    400: "Send the image as multipart/form-data in a field named 'file'.",
    404: "See / for the upload form and POST /file/ for the API.",
    405: "Use GET / for the form and POST /file/ to classify an image.",
    413: "Send a smaller file.",
    500: "This is a server problem; try again later.",
}


def wants_html() -> bool:
    """Browsers (which rank text/html first) get pages; curl's */* and API clients get JSON."""
    # On a tie (*/*, or no Accept at all) best_match picks the first offer: JSON.
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def body_too_large_message(limit: int) -> str:
    return f"The request body is larger than the {limit:,}-byte ({limit / 2**20:g} MiB) limit."


def error_response(status: int, code: str, message: str, hint: str, **extra) -> Response:
    if wants_html():
        page = render_template("error.html", status=status, message=message, hint=hint, **extra)
        return make_response(page, status)
    body = {"error": {"status": status, "code": code, "message": message, "hint": hint, **extra}}
    return make_response(jsonify(body), status)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'",
}


def init_app(app: Flask) -> None:
    """Every response carries the security headers; every error leaves through here."""
    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    register_error_handlers(app)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def handle_service_error(exc: ServiceError):
        status = STATUS_BY_ERROR.get(type(exc), 500)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        extra = {"id": exc.upload_id} if getattr(exc, "upload_id", None) else {}
        response = error_response(status, error_code(type(exc).__name__), exc.message, exc.hint, **extra)
        if isinstance(exc, DecodeBusyError):
            response.headers["Retry-After"] = "5"
        elif isinstance(exc, TooManyAttemptsError):
            response.headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, FeedbackLimitError):
            response.headers["Retry-After"] = "3600"
        elif isinstance(exc, NotAuthorizedError):
            response.headers["WWW-Authenticate"] = 'Bearer realm="keras-serve review"'
        return response

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = body_too_large_message(int(app.config["MAX_CONTENT_LENGTH"]))
        response = error_response(status, error_code(exc.name), message, HINT_BY_STATUS.get(status, ""))
        # Keep protocol headers such as Allow (405) that Werkzeug attached.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "Something went wrong on the server.", HINT_BY_STATUS[500])
