"""Typed exceptions raised by the core; `keras_serve.web.responses` maps them to HTTP responses.

Each carries a `message` (what was wrong) and a `hint` (what the user should do),
so the web layer never has to invent wording and never leaks internals.
"""
from __future__ import annotations

import re


class ServiceError(Exception):
    """Base class for every error the service reports to a client or operator."""

    hint: str = ""
    # Seconds a client should wait before trying again (the Retry-After header); None: not said.
    retry_after_s: int | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint


def error_code(name: str) -> str:
    """'NotAnImageError' / 'Method Not Allowed' -> 'not_an_image' / 'method_not_allowed'.

    The `code` of an error answer and the `kind` label of the storage-error metric: a value
    from the class (or HTTP reason) name, never from a message, which could carry a path or an id.
    """
    name = re.sub(r"Error$", "", name).strip()
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# --- client mistakes about the uploaded image ------------------------------------------
class ImageError(ServiceError):
    """The uploaded bytes cannot be turned into a model input."""


class MissingFileError(ImageError):
    hint = "Send the image as multipart/form-data in a field named 'file'."


class EmptyImageError(ImageError):
    hint = "Choose an image file and send it in the multipart field named 'file'."


class NotAnImageError(ImageError):
    hint = "Send a JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF image."


class CorruptImageError(ImageError):
    hint = "The file looks damaged or truncated; re-export or re-download it and try again."


class ImageTooLargeError(ImageError):
    hint = "Downscale the image (for example to 4000x4000 or less) and try again."


class TooManyFilesError(ServiceError):
    """One request carries more `file` parts than MAX_FILES_PER_REQUEST."""

    hint = "Send fewer files per request (split them over several requests)."


class TooManyFormPartsError(ServiceError):
    """A multipart body with more parts than the form parser takes (Flask's MAX_FORM_PARTS)."""

    hint = "Send only the form's fields: one part per file and per field."


class RequestTimeoutError(ServiceError):
    """A request body still arriving after its deadline (the granian HTTP layer's app side)."""

    hint = "Send the request body without long pauses."


class IncompleteBodyError(ServiceError):
    """A request body that ended before its Content-Length: the client stopped sending."""

    hint = "Send the whole body that Content-Length announces."


class DecodeBusyError(ServiceError):
    """Large images already being decoded hold the memory budget; this one waited too long."""

    hint = "The server is busy decoding other large images; try again in a few seconds, or send a smaller image."
    retry_after_s = 5


# --- operator mistakes at startup ------------------------------------------------------
class StartupError(ServiceError):
    """The server cannot start as configured; printed as one line, exit status 2."""


class ModelLoadError(StartupError):
    """The model file cannot be served; raised at startup, printed as one line."""


class ModelFileRefused(ModelLoadError):
    """A model file refused before anything in it is deserialized (keras_serve/model/file_safety.py):
    its layout is not what Keras writes, or it reads storage outside itself."""

    hint = "Re-save the model with model.save('model.keras') (or 'model.h5') and try that file."


class ModelCodeRefused(ModelFileRefused):
    """The file's stored config would run code or need it: Lambda bytecode, or a class, module or
    function outside Keras's built-ins."""

    hint = ("A model file may only use Keras's built-in layers and functions: re-save it without Lambda layers "
            "and custom classes. For a model you wrote yourself, start the server (or python -m keras_serve.model) "
            "with --trust-model-code.")


class ModelTooLarge(ModelFileRefused):
    """The file's weights declare more memory than MODEL_MAX_WEIGHT_BYTES."""

    hint = "If the model really is this large, raise MODEL_MAX_WEIGHT_BYTES (--model-max-weight-mb)."


class ConfigurationError(StartupError):
    """A setting is malformed or inconsistent (an unreadable token file, a bad rate limit)."""


class DatasetError(ServiceError):
    """A training or evaluation data folder cannot be used as asked (a label folder that names
    no class, a manifest that disagrees with its files, a model to start from that does not
    fit the run); printed as one line, exit status 2."""


# --- access control (keras_serve/web/access.py) ----------------------------------------
class AuthenticationError(ServiceError):
    """POST /file/ needs an API token and the request has none, or not a valid one."""

    # RFC 6750: the WWW-Authenticate challenge of a 401 from a Bearer-protected resource.
    challenge = 'Bearer realm="keras-serve"'
    hint = ("Send an API token in an 'Authorization: Bearer <token>' header (curl: "
            "-H 'Authorization: Bearer <token>'). The server's operator gives out the tokens.")


class MissingTokenError(AuthenticationError):
    pass


class InvalidTokenError(AuthenticationError):
    challenge = 'Bearer realm="keras-serve", error="invalid_token"'
    hint = ("Check the token (copied whole, no spaces or quotes) and send it as "
            "'Authorization: Bearer <token>'; ask the server's operator if it was revoked.")


class RateLimitedError(ServiceError):
    """More uploads than RATE_LIMIT allows for one API token or client address."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, f"Wait {retry_after_s} s (the Retry-After header), then send it again; "
                                  "the operator can raise RATE_LIMIT.")
        self.retry_after_s = retry_after_s


# --- server-side trouble after a request was accepted ---------------------------------
class PredictionError(ServiceError):
    hint = "This is a server problem; try again shortly. The upload was kept."


class ModelOutputInvalidError(PredictionError):
    """The model answered an image with scores that are not probabilities (infinite, NaN,
    outside [0, 1], or a softmax not summing to 1): nothing is served or recorded as an answer."""

    hint = ("The server's model gave an answer that is not a probability, so none is given. The upload "
            "was kept. The server's operator must check the model (its last layer should be a sigmoid or "
            "a softmax); trying again will not help until then.")

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem  # one of served_model.OUTPUT_PROBLEMS: a metric label


# --- uploads and their storage ---------------------------------------------------------
class UploadNotFound(ServiceError):
    hint = "Check the id; uploads are kept for a limited time."


class StorageError(ServiceError):
    # No guess at the cause here: the message says what is known, the log has the details.
    hint = "The upload could not be saved, so it was not classified. Try again later; " \
           "if it keeps happening, tell the server's operator."


class ModelFileDamaged(StorageError):
    """A published model file in the image store no longer matches its sha256: trying again
    cannot help (keras_serve/storage/model_registry.py)."""


# --- heatmaps (Grad-CAM) -------------------------------------------------------------------
class NoConvolutionLayerError(ServiceError):
    """The served model has no 2-D convolution layer, so Grad-CAM has nothing to look at."""

    hint = ("Heatmaps need a convolutional (CNN) Keras model; this server's model has no convolution "
            "layer, so only the classification is available.")


class HeatmapBusyError(ServiceError):
    """Another heatmap is being computed and this one waited its bounded time."""

    hint = "Heatmaps are made one at a time so classification stays fast; try again in a few seconds."
    retry_after_s = 5


# --- the review loop -------------------------------------------------------------------
class ReviewRequestError(ServiceError):
    """A listing filter, cursor, label or review body that cannot be used."""

    hint = "See docs/review.md for the listing's filters and the review API."


class NotAuthorizedError(ServiceError):
    """No admin credential, or a wrong or expired one."""

    hint = "Send Authorization: Bearer <admin token>, or log in at /review/login."


class TooManyAttemptsError(ServiceError):
    """Failed logins from this client came too fast; it must wait before the next try."""

    hint = "Wait a little and try again with the right token."
    retry_after_s = 1


class FeedbackLimitError(ServiceError):
    """One client sent more feedback in an hour than anyone plausibly would."""

    hint = "Try again in an hour."
    retry_after_s = 3600


# --- model versions (keras_serve/model/versions.py) ------------------------------------
class ModelVersionError(ServiceError):
    """Base of the errors about publishing, promoting and rolling back model versions."""

    hint = "See docs/model-versions.md for publishing, promoting and rolling back models."


class CandidateRefused(ModelVersionError):
    """A model file that must not serve: it does not load, its converted engine answers
    differently from TensorFlow, or its labels differ from the served model's."""


class ModelVersionNotFound(ModelVersionError):
    hint = "List the published versions with GET /api/models (or `python -m keras_serve.model list`)."


class NothingToRollBack(ModelVersionError):
    """No promotion is in effect: the servers already answer with the model they started with."""


class ModelRequestError(ModelVersionError):
    """A request to publish a model that carries no usable model file."""

    hint = ("Send the model as multipart/form-data: the file (.h5 or .keras) in the field 'model', its card "
            "(JSON) optionally in the field 'card'.")
