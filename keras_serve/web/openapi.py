"""The API contract: an OpenAPI 3.1 document built from the app's own routes, by apispec.

Every view declares what it takes and answers, next to itself, with `@operation`:

    @bp.get("/uploads/<upload_id>/record")
    @operation("The stored record of one upload", tags=["uploads"],
               responses={200: json_body(UploadRecord), 404: ERROR, 503: ERROR})
    def upload_record(upload_id: str): ...

Schemas are pydantic models (`keras_serve.web.api_models`); pydantic only writes their JSON
Schema (OpenAPI 3.1 speaks JSON Schema 2020-12, as pydantic does) -- nothing validates requests
or responses at run time, so the contract costs a request nothing. The tests check the
server against the document instead (Schemathesis, tests/test_api_contract.py).

`build_spec(app)` walks `app.url_map`, so the document has exactly the routes Flask serves:
a path per URL rule, an operation per method. A rule whose view declares nothing is listed
by `undescribed_routes(app)` (a test fails on it). Views that are not ours (Flask's static
files, the metrics scrape) are described by endpoint name with `describe_endpoint`.

Added to every operation: the optional `X-Request-ID` request header, the `X-Request-ID`
response header, and a 500 answer with the error body. The document follows the configuration:
the routes that need an API token (API_TOKENS set) or the admin token say so (`security`), and a
path served with and without its trailing slash (`/file`, `/file/`) is listed once, with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

from apispec import APISpec
from flask import Flask, Response, current_app, jsonify
from pydantic import BaseModel
from werkzeug.routing import Rule

from keras_serve.web.api_models import ErrorBody, REQUEST_ID_SCHEMA

OPENAPI_VERSION = "3.1.0"
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}  # Flask answers these for every rule by itself
OPERATION_ATTRIBUTE = "__openapi_operations__"
RULE_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")
# The admin's blueprints (review, model versions, dashboard): routed always, but 404 while no admin token
# is set, so the document leaves them out then (it would advertise an admin surface that is off).
ADMIN_BLUEPRINTS = frozenset({"review", "models", "dashboard"})
# Admin routes anyone may call (the login form and its POST): no security requirement on them.
ADMIN_PUBLIC_ENDPOINTS = frozenset({"review.login_form", "review.login"})
# Security schemes, by name: what a client must send (keras_serve.web.access, admin_auth).
API_TOKEN_SCHEME = "apiToken"
ADMIN_BEARER_SCHEME = "adminToken"
ADMIN_COOKIE_SCHEME = "adminSession"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    API_TOKEN_SCHEME: {"type": "http", "scheme": "bearer",
                       "description": "One of the server's API tokens (API_TOKENS, API_TOKENS_FILE): "
                                      "`Authorization: Bearer <token>`. Needed by POST /file/ and the "
                                      "heatmap while tokens are on."},
    ADMIN_BEARER_SCHEME: {"type": "http", "scheme": "bearer",
                          "description": "The admin token (KERAS_SERVE_ADMIN_TOKEN): `Authorization: Bearer "
                                         "<token>`, for programs; the reviewer's name may follow in X-Reviewer."},
    # "name": the app's SESSION_COOKIE_NAME, filled in by build_spec
    ADMIN_COOKIE_SCHEME: {"type": "apiKey", "in": "cookie",
                          "description": "The session cookie of a reviewer logged in at /review/login; a "
                                         "change sent with it also needs the page's CSRF token (X-CSRFToken)."},
}
# The order of the tags in the document (and so on /docs): what a programmer needs first.
TAG_ORDER = ("classify", "uploads", "model", "operations", "reference", "pages", "review", "models", "dashboard")
# Verbs a view's name may start with; any other name gets the HTTP method put before it.
VERB_PREFIXES = ("get", "list", "classify", "publish", "promote", "rollback", "review", "login", "logout")
View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Body:
    """One media type of a request or response body."""

    media_type: str
    schema: type[BaseModel] | tuple[type[BaseModel], ...] | dict[str, Any] = field(default_factory=dict)
    example: Any = None


class _ErrorMarker:
    """`ERROR` in a `responses` map: the app's error body (JSON, or the HTML page for browsers)."""

    def __init__(self, *alternatives: type[BaseModel]) -> None:
        self.alternatives = alternatives  # other JSON bodies an error status may carry


ERROR = _ErrorMarker()


def error_or(*alternatives: type[BaseModel]) -> _ErrorMarker:
    """The error body, or one of `alternatives` (POST /file/'s several files, all refused: their
    {"results": [...]} under the first one's status)."""
    return _ErrorMarker(*alternatives)
ResponseSpec = Body | list[Body] | _ErrorMarker


def json_body(schema: type[BaseModel] | tuple[type[BaseModel], ...] | dict[str, Any], example: Any = None) -> Body:
    return Body("application/json", schema, example)


def html_page() -> Body:
    return Body("text/html", {"type": "string"})


def binary(media_type: str) -> Body:
    """Bytes of some media type (an image, a file): `contentMediaType`, as OpenAPI 3.1 writes it."""
    return Body(media_type, {"type": "string", "contentMediaType": media_type})


def form_body(schema: type[BaseModel] | dict[str, Any]) -> Body:
    """An HTML form's fields (application/x-www-form-urlencoded)."""
    return Body("application/x-www-form-urlencoded", schema)


def multipart(schema: type[BaseModel] | dict[str, Any]) -> Body:
    return Body("multipart/form-data", schema)


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: Mapping[int, ResponseSpec]
    description: str = ""
    tags: tuple[str, ...] = ()
    request: Body | None = None
    request_required: bool = True
    # Schemas of path variables, by name; a variable not named here is a plain string.
    path: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # Headers of one answer, by status: {503: {"Retry-After": {"type": "string"}}}
    response_headers: Mapping[int, Mapping[str, dict[str, Any]]] = field(default_factory=dict)
    # OpenAPI links from one answer to other operations, by status (see POST /file/).
    links: Mapping[int, Mapping[str, dict[str, Any]]] = field(default_factory=dict)
    # The operationId; default: from the view's name (`upload_record` -> `getUploadRecord`).
    operation_id: str | None = None
    # Per-part encodings of a multipart request body (OpenAPI's `encoding`, by field name).
    encoding: Mapping[str, dict[str, Any]] = field(default_factory=dict)


def operation(summary: str, *, responses: Mapping[int, ResponseSpec], description: str = "",
              tags: Iterable[str] = (), request: Body | None = None, request_required: bool = True,
              path: Mapping[str, dict[str, Any]] | None = None,
              response_headers: Mapping[int, Mapping[str, dict[str, Any]]] | None = None,
              links: Mapping[int, Mapping[str, dict[str, Any]]] | None = None,
              methods: Iterable[str] | None = None, operation_id: str | None = None,
              encoding: Mapping[str, dict[str, Any]] | None = None) -> Callable[[View], View]:
    """Declare the contract of a view (put it under the route decorators).

    `responses`: status -> `json_body(Model)`, `html_page()`, `binary("image/png")`, a list of
    these (content negotiation), or `ERROR`. `methods`: which of the view's methods this
    describes (default: all of them); stack several `@operation`s for a view with several.
    `operation_id`: the operationId, when the one made from the view's name does not read well.
    """
    declared = Operation(summary, dict(responses), description, tuple(tags), request, request_required,
                         dict(path or {}), dict(response_headers or {}), dict(links or {}), operation_id,
                         dict(encoding or {}))

    def attach(view: View) -> View:
        table = getattr(view, OPERATION_ATTRIBUTE, None)
        if table is None:
            table = {}
            setattr(view, OPERATION_ATTRIBUTE, table)
        for method in (methods or ["*"]):
            table[method.upper()] = declared
        return view

    return attach


_BY_ENDPOINT: dict[str, dict[str, Operation]] = {}


def describe_endpoint(endpoint: str, declared: Operation, methods: Iterable[str] = ("*",)) -> None:
    """The contract of a view we do not define (Flask's `static`, the `metrics` scrape)."""
    table = _BY_ENDPOINT.setdefault(endpoint, {})
    for method in methods:
        table[method.upper()] = declared


def declared_operation(app: Flask, rule: Rule, method: str) -> Operation | None:
    view = app.view_functions.get(rule.endpoint)
    table = getattr(view, OPERATION_ATTRIBUTE, None) or _BY_ENDPOINT.get(rule.endpoint, {})
    return table.get(method) or table.get("*")


def served_operations(app: Flask) -> list[tuple[Rule, str]]:
    """(rule, method) for everything the app routes, HEAD and OPTIONS aside."""
    return [(rule, method) for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule)
            for method in sorted((rule.methods or set()) - IMPLICIT_METHODS)]


def undescribed_routes(app: Flask) -> list[str]:
    """A line per routed (method, rule) that declares no contract, saying what to add."""
    missing = []
    for rule, method in served_operations(app):
        if declared_operation(app, rule, method) is not None:
            continue
        view = app.view_functions.get(rule.endpoint)
        where = f"{getattr(view, '__module__', '?')}.{getattr(view, '__qualname__', rule.endpoint)}"
        missing.append(f"{method} {rule.rule} (endpoint {rule.endpoint!r}, view {where}): add "
                       f"@operation(\"<summary>\", responses={{200: json_body(<Model>), 4xx: ERROR}}) from "
                       f"keras_serve.web.openapi under its route decorator (see docs/api.md); a view that is "
                       f"not a function of ours: describe_endpoint({rule.endpoint!r}, Operation(...))")
    return missing


def openapi_path(rule: Rule) -> str:
    """`/uploads/<upload_id>` -> `/uploads/{upload_id}` (converters such as `path:` dropped)."""
    return RULE_VARIABLE.sub(r"{\1}", rule.rule)


def _model_schema(spec: APISpec, schema: type[BaseModel] | tuple[type[BaseModel], ...] | dict[str, Any]) -> dict[str, Any]:
    """A $ref to the model, registered in components with the models it uses; a tuple of
    models is one of them (`oneOf`)."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, tuple):
        return {"oneOf": [_model_schema(spec, one) for one in schema]}
    name = schema.__name__
    if name not in spec.components.schemas:
        generated = schema.model_json_schema(ref_template="#/components/schemas/{model}")
        for nested_name, nested in generated.pop("$defs", {}).items():
            if nested_name not in spec.components.schemas:
                spec.components.schema(nested_name, nested)
        spec.components.schema(name, generated)
    return {"$ref": f"#/components/schemas/{name}"}


def _content(spec: APISpec, bodies: Iterable[Body]) -> dict[str, Any]:
    content = {}
    for body in bodies:
        media: dict[str, Any] = {"schema": _model_schema(spec, body.schema)}
        if body.example is not None:
            media["example"] = body.example
        content[body.media_type] = media
    return content


REQUEST_ID_HEADER = {"description": "The request's id: the client's X-Request-ID when it is sane "
                                    "(1-128 of A-Z a-z 0-9 . _ : -), else one the server made.",
                     "schema": REQUEST_ID_SCHEMA, "required": True}


def _responses(spec: APISpec, declared: Operation) -> dict[str, Any]:
    from werkzeug.http import HTTP_STATUS_CODES

    answers = {**declared.responses}
    answers.setdefault(500, ERROR)
    out = {}
    for status, answer in sorted(answers.items()):
        if isinstance(answer, _ErrorMarker):
            bodies = [json_body((ErrorBody, *answer.alternatives) if answer.alternatives else ErrorBody), html_page()]
            description = f"{HTTP_STATUS_CODES.get(status, 'Error')}: the error body says what was wrong and what to do"
        else:
            bodies = answer if isinstance(answer, list) else [answer]
            description = HTTP_STATUS_CODES.get(status, "")
        headers = {"X-Request-ID": REQUEST_ID_HEADER}
        for name, schema in declared.response_headers.get(status, {}).items():
            headers[name] = {"schema": schema, "required": True}
        out[str(status)] = {"description": description, "headers": headers, "content": _content(spec, bodies)}
        if status in declared.links:
            out[str(status)]["links"] = dict(declared.links[status])
    return out


def _camel(words: list[str]) -> str:
    return words[0].lower() + "".join(word[:1].upper() + word[1:] for word in words[1:])


def operation_id(rule: Rule, method: str, declared: Operation) -> str:
    """`web.upload_record` GET -> `getUploadRecord`; `web.classify` POST -> `classify` (a view
    named by a verb keeps it); the declared `operation_id` wins."""
    if declared.operation_id:
        return declared.operation_id
    words = [word for word in re.split(r"[^A-Za-z0-9]+", rule.endpoint.rpartition(".")[2]) if word]
    if not words or words[0].lower() not in VERB_PREFIXES:
        words.insert(0, method.lower())
    return _camel(words)


def canonical_rules(app: Flask) -> list[tuple[Rule, str]]:
    """`served_operations`, less the aliases: a rule that is another rule of the same endpoint
    and method without its trailing slash (`/file` beside `/file/`) is served, not listed."""
    served = served_operations(app)
    listed = {(rule.endpoint, rule.rule, method) for rule, method in served}
    return [(rule, method) for rule, method in served
            if (rule.endpoint, rule.rule + "/", method) not in listed]


def _security(app: Flask, rule: Rule) -> list[dict[str, list[str]]] | None:
    """Who may call this rule, as this app is configured: None when anyone may."""
    blueprint = rule.endpoint.partition(".")[0]
    if blueprint in ADMIN_BLUEPRINTS and rule.endpoint not in ADMIN_PUBLIC_ENDPOINTS:
        return [{ADMIN_BEARER_SCHEME: []}, {ADMIN_COOKIE_SCHEME: []}]
    from keras_serve.web.access import GUARDED_ENDPOINTS

    access = app.extensions.get("access")
    if rule.endpoint in GUARDED_ENDPOINTS and access is not None and access.tokens is not None:
        if access.settings.allow_anonymous_uploads:
            return [{API_TOKEN_SCHEME: []}, {}]  # {}: none at all is also accepted
        return [{API_TOKEN_SCHEME: []}]
    return None


def build_spec(app: Flask, title: str = "keras-serve", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of everything `app` routes (undescribed routes left out, and
    the admin's routes while admin is off)."""
    spec = APISpec(title=title, version=version, openapi_version=OPENAPI_VERSION, info={
        "description": "Classify images with a Keras model. Every answer carries X-Request-ID; every error "
                       "answer has the same body (JSON, or an HTML page when the client prefers text/html). "
                       "Reference: /docs; this document: /openapi.json.",
        "license": {"name": "MIT", "identifier": "MIT"},
    })
    _model_schema(spec, ErrorBody)
    admin_on = "admin_auth" in app.extensions
    paths: dict[str, dict[str, Any]] = {}
    schemes_used: set[str] = set()
    operation_ids: dict[str, str] = {}
    for rule, method in canonical_rules(app):
        declared = declared_operation(app, rule, method)
        if declared is None or (not admin_on and rule.endpoint.partition(".")[0] in ADMIN_BLUEPRINTS):
            continue
        parameters = [{"name": variable, "in": "path", "required": True,
                       "schema": declared.path.get(variable, {"type": "string", "minLength": 1})}
                      for variable in rule.arguments]
        parameters.append({"name": "X-Request-ID", "in": "header", "required": False,
                           "description": "Your id for this request, echoed back and logged; an id that is "
                                          "not 1-128 of A-Z a-z 0-9 . _ : - is replaced.",
                           "schema": {"type": "string"}})
        name = operation_id(rule, method, declared)
        where = f"{method} {rule.rule}"
        if operation_ids.setdefault(name, where) != where:
            raise ValueError(f"operationId {name!r} of {where} is also {operation_ids[name]}'s: "
                             f"give one of them @operation(..., operation_id=...)")
        entry: dict[str, Any] = {"operationId": name, "summary": declared.summary,
                                 "parameters": sorted(parameters, key=lambda p: (p["in"], p["name"])),
                                 "responses": _responses(spec, declared)}
        security = _security(app, rule)
        if security is not None:
            entry["security"] = security
            schemes_used.update(name for requirement in security for name in requirement)
        if declared.description:
            entry["description"] = declared.description
        if declared.tags:
            entry["tags"] = list(declared.tags)
        if declared.request is not None:
            entry["requestBody"] = {"required": declared.request_required,
                                    "content": _content(spec, [declared.request])}
            if declared.encoding:
                entry["requestBody"]["content"][declared.request.media_type]["encoding"] = dict(declared.encoding)
        paths.setdefault(openapi_path(rule), {})[method.lower()] = entry
    used_tags = {tag for operations in paths.values() for entry in operations.values() for tag in entry.get("tags", ())}
    for tag in sorted(used_tags, key=lambda t: (TAG_ORDER.index(t) if t in TAG_ORDER else len(TAG_ORDER), t)):
        spec.tag({"name": tag})
    for scheme in sorted(schemes_used):
        described = dict(SECURITY_SCHEMES[scheme])
        if described["type"] == "apiKey":
            described["name"] = app.config["SESSION_COOKIE_NAME"]
        spec.components.security_scheme(scheme, described)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def init_app(app: Flask) -> None:
    """GET /openapi.json (built once, on first use: every route is registered by then)."""

    @operation("This API's OpenAPI 3.1 document", tags=["reference"], operation_id="getOpenApiDocument",
               responses={200: json_body({"type": "object", "required": ["openapi", "info", "paths"]})})
    def openapi_document() -> Response:
        document = current_app.extensions.get("openapi")
        if document is None:
            document = current_app.extensions["openapi"] = build_spec(current_app)
        response = jsonify(document)
        response.headers["Cache-Control"] = "no-cache"
        return response

    app.add_url_rule("/openapi.json", endpoint="openapi", view_func=openapi_document, methods=["GET"])


describe_endpoint("static", Operation(
    "A file of the web pages (style sheet, the API reference's script)", tags=("pages",),
    responses={200: Body("*/*", {"type": "string"}), 404: ERROR},
    path={"filename": {"type": "string", "minLength": 1, "examples": ["style.css", "api-reference.js"]}}))
