"""The bodies of the API, as pydantic models: the schemas of /openapi.json (see openapi.py).

Only their JSON Schema is used: views build their answers as before, and the Schemathesis run
in the tests checks that the answers match these declarations.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# What a client's X-Request-ID must look like to be kept (keras_serve.web.request_log).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
REQUEST_ID_SCHEMA = {"type": "string", "pattern": REQUEST_ID_PATTERN}


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status, repeated")
    code: str = Field(description="Machine-readable kind, e.g. not_an_image, request_entity_too_large",
                      pattern=r"^[a-z0-9_]+$")
    message: str = Field(description="What was wrong")
    hint: str = Field(description="What to do about it")
    request_id: str = Field(description="The request's id (also in the X-Request-ID header); quote it "
                                        "when reporting a problem", pattern=REQUEST_ID_PATTERN)
    id: str | None = Field(None, description="The upload's id, when the upload was stored before the error")


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx) of every route; browsers get the same as an HTML page."""

    error: ErrorDetail


class LabelScore(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="The winning label (same as label; kept for old clients)")
    label: str = Field(description="The winning label")
    confidence: float = Field(ge=0, le=1, description="The winning label's score")
    scores: dict[str, float] = Field(description="Every label's score")
    top: list[LabelScore] = Field(description="Labels by score, best first")
    unsure: bool | None = Field(None, description="The winning score is under the server's UNSURE_BELOW "
                                                  "(GET /model: unsure_below); absent in records made before it")


class Classification(Prediction):
    id: str = Field(description="The upload's id: GET /uploads/{id} and /uploads/{id}/record")
    image_url: str = Field(description="Where the stored image is served")
    milliseconds: float = Field(ge=0, description="Time from the upload's arrival to its answer")
    model_version: str | None = Field(None, description="sha256 of the model file that answered (GET /model: "
                                                        "sha256; it changes when a version is promoted)")


FILENAME_DESCRIPTION = "The client's file name (last segment, control characters removed; null if none was sent)"


class ClassifiedItem(Classification):
    """One image of several that was classified: its answer, and which file it was."""

    filename: str | None = Field(description=FILENAME_DESCRIPTION)


class ItemError(BaseModel):
    """One image of several that was not classified; the others are answered beside it."""

    error: ErrorDetail
    filename: str | None = Field(description=FILENAME_DESCRIPTION)


class ClassificationList(BaseModel):
    """The answer to several `file` parts in one request, in the order sent."""

    results: list[ClassifiedItem | ItemError]


# One `file` part answers a Classification (exactly as before several were possible); two or
# more answer {"results": [...]}.
CLASSIFY_ANSWER = (Classification, ClassificationList)

# The most `file` parts the document allows: MAX_FILES_PER_REQUEST's default (a server set lower
# answers 413 too_many_files past its own).
DEFAULT_MAX_FILES = 20
# No minLength: among several files an empty one is answered as its own item (400 empty_image),
# beside the others'.
IMAGE_PART: dict[str, Any] = {"type": "string", "format": "binary", "contentMediaType": "image/*",
                              "description": "An image: JPEG, PNG, GIF, WebP, BMP, TIFF, HEIC/HEIF or AVIF"}
CLASSIFY_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "array", "items": IMAGE_PART, "minItems": 1, "maxItems": DEFAULT_MAX_FILES,
                            "description": "One `file` part per image, all named `file`. One part answers a "
                                           "Classification; two or more answer {\"results\": [...]} in the "
                                           "order sent, each naming its file."}},
}
# Each `file` part: any image type, with the client's file name (echoed back, sanitized, in `results`).
CLASSIFY_ENCODING: dict[str, Any] = {"file": {"contentType": "image/*, application/octet-stream"}}


class UploadRecord(BaseModel):
    id: str
    received: str = Field(description="When it arrived, ISO 8601 in UTC")
    bytes: int = Field(ge=0)
    sha256: str
    format: str | None = Field(description="The image format the server found, e.g. JPEG")
    client_filename: str | None = Field(description="The file name the client sent (audit text only)")
    model: str = Field(description="The model file that answered")
    prediction: Prediction | None
    error: str | None = Field(description="Why it has no prediction, when it has none")
    milliseconds: float | None
    image_key: str


class ModelInput(BaseModel):
    height: int
    width: int
    channels: int
    layout: str


class ModelPreprocessing(BaseModel):
    scaling: str
    max_pixels: int
    max_decode_bytes: int


class ModelEngine(BaseModel):
    name: str
    version: str
    fallback_reason: str | None


class ModelDescription(BaseModel):
    """The serving contract of the loaded model (more keys may come from its model card)."""

    file: str
    parameters: int
    input: ModelInput
    preprocessing: ModelPreprocessing
    output: str = Field(description="sigmoid or softmax")
    labels: list[str]
    threshold: float | None = Field(description="The sigmoid's decision threshold (null for softmax)")
    engine: ModelEngine
    sha256: str | None = Field(None, description="The model file's sha256: its version")
    versions: dict[str, Any] | None = Field(
        None, description="How this process follows promotions: swaps made, the last one, versions refused and why")


class Liveness(BaseModel):
    alive: bool


class ComponentHealth(BaseModel):
    ok: bool


class StorageHealth(BaseModel):
    """ok / not ok per half; where each store is and why it failed go to the log only."""

    ok: bool
    records: ComponentHealth
    images: ComponentHealth


class Readiness(BaseModel):
    ready: bool
    batches: int
    images: int
    pid: int
    storage: StorageHealth
