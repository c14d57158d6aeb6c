"""The one place where errors become HTTP responses (JSON or an HTML page, by Accept).

Core code raises typed `errors.ServiceError`s; Werkzeug raises HTTPExceptions for protocol
problems (405, 413, 404). Both leave here with the right status, a message saying what was
wrong and a hint saying what to do. Nothing else escapes: unexpected exceptions are logged
with their traceback and answered with a plain 500 that reveals nothing.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from keras_serve.errors import (AuthenticationError, CandidateRefused, CorruptImageError, DecodeBusyError, EmptyImageError,
                                FeedbackLimitError, HeatmapBusyError, ImageTooLargeError, InvalidTokenError,
                                MissingFileError, MissingTokenError, ModelOutputInvalidError, ModelRequestError, ModelVersionNotFound, NoConvolutionLayerError,
                                NotAnImageError, NothingToRollBack,
                                NotAuthorizedError, PredictionError, RateLimitedError, ReviewRequestError,
                                RequestTimeoutError, IncompleteBodyError, ServiceError, StorageError, TooManyAttemptsError,
                                TooManyFilesError, TooManyFormPartsError,
                                UploadNotFound,
                                error_code)
from keras_serve.web.request_log import current_request_id, masked_path

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    EmptyImageError: 400,
    MissingFileError: 400,
    NotAnImageError: 415,
    CorruptImageError: 422,
    ImageTooLargeError: 413,
    MissingTokenError: 401,
    InvalidTokenError: 401,
    UploadNotFound: 404,
    RateLimitedError: 429,
    PredictionError: 503,
    ModelOutputInvalidError: 503,
    StorageError: 503,
    DecodeBusyError: 503,
    TooManyFilesError: 413,
    TooManyFormPartsError: 413,
    RequestTimeoutError: 408,
    IncompleteBodyError: 400,
    NoConvolutionLayerError: 422,
    HeatmapBusyError: 503,
    ReviewRequestError: 400,
    NotAuthorizedError: 401,
    TooManyAttemptsError: 429,
    FeedbackLimitError: 429,
    CandidateRefused: 422,
    ModelRequestError: 400,
    ModelVersionNotFound: 404,
    NothingToRollBack: 409,
}

HINT_BY_STATUS = {
    400: "Send the image as multipart/form-data in a field named 'file'.",
    404: "See / for the upload form and POST /file/ for the API.",
    405: "Use GET / for the form and POST /file/ to classify an image.",
    413: "Send a smaller file, or fewer files per request.",
    500: "This is a server problem; try again later.",
}


def wants_html() -> bool:
    """Browsers (which rank text/html first) get pages; curl's */* and API clients get JSON."""
    # On a tie (*/*, or no Accept at all) best_match picks the first offer: JSON.
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def body_too_large_message(limit: int) -> str:
    return f"The request body is larger than the {limit:,}-byte ({limit / 2**20:g} MiB) limit."


def service_error_status(exc: ServiceError) -> int:
    return STATUS_BY_ERROR.get(type(exc), 500)


def service_error_body(exc: ServiceError) -> dict:
    """The `error` object of an answer to `exc` (also one item's error in a multi-image answer)."""
    status = service_error_status(exc)
    if status >= 500 and type(exc) not in STATUS_BY_ERROR:
        code = "internal_error"  # never a class name of the server's insides
    else:
        code = error_code(type(exc).__name__)
    extra = {"id": exc.upload_id} if getattr(exc, "upload_id", None) else {}
    return {"status": status, "code": code, "message": exc.message, "hint": exc.hint, **extra}


def error_response(status: int, code: str, message: str, hint: str, **extra) -> Response:
    """The error answer of every route (body: openapi's ErrorBody), with the request's id."""
    request_id = current_request_id()
    g.error_code = code  # for the request's log line
    if wants_html():
        page = render_template("error.html", status=status, message=message, hint=hint, request_id=request_id,
                               **extra)
        return make_response(page, status)
    body = {"error": {"status": status, "code": code, "message": message, "hint": hint, "request_id": request_id,
                      **extra}}
    return make_response(jsonify(body), status)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Scripts, styles and fetches only from this origin; blob: images are the page's own previews
    # of photos not yet sent (object URLs). No inline script or style anywhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
}


def init_app(app: Flask) -> None:
    """Every response carries the security headers; every error leaves through here."""
    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    register_error_handlers(app)


def service_error_response(exc: ServiceError) -> Response:
    """A typed error as its answer: status, body, and the protocol headers its status needs."""
    status = service_error_status(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message, extra={"error_code": error_code(type(exc).__name__)})
    extra = {"id": exc.upload_id} if getattr(exc, "upload_id", None) else {}
    if extra:
        g.upload_id = exc.upload_id  # for the request's log line
    response = error_response(status, error_code(type(exc).__name__), exc.message, exc.hint, **extra)
    if exc.retry_after_s is not None:  # each error class says its own (errors.py)
        response.headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, NotAuthorizedError):
        response.headers["WWW-Authenticate"] = 'Bearer realm="keras-serve review"'
    elif isinstance(exc, AuthenticationError):
        response.headers["WWW-Authenticate"] = exc.challenge
    return response


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ServiceError, service_error_response)

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
        log.exception("unhandled error on %s %s", request.method, masked_path(request.path),
                      extra={"error_code": "internal_error"})
        return error_response(500, "internal_error", "Something went wrong on the server.", HINT_BY_STATUS[500])
