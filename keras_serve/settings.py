"""Every server setting, declared once: name, type, default, environment variable, flag, help.

`create_app` takes its defaults and environment values from this table, the CLI builds its
flags from it, and the options table of docs/reference.md is printed by
`python -m keras_serve.settings` (a test keeps that page in step). Precedence: default, then
KERAS_SERVE_<NAME>, then the command line or the `config` argument of `create_app`.
"""
from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from keras_serve.model.engines import ENGINE_CHOICES
from keras_serve.model.file_safety import DEFAULT_MAX_WEIGHT_BYTES
from keras_serve.pipeline.preprocessing import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, SCALINGS
from keras_serve.worker_count import parse_workers

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "KERAS_SERVE"
DEFAULT_MODEL_PATH = PROJECT_ROOT / "models" / "cats_vs_dogs.h5"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _optional_str(text: str) -> str | None:
    return text or None


LOG_FORMATS = ("auto", "json", "text")


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return value


@dataclass(frozen=True)
class Setting:
    name: str                         # the app.config key
    default: Any
    help: str
    parse: Callable[[str], Any] = str  # from an environment variable or a flag's text
    flag: str | None = None            # command-line flag; None: environment/config only
    choices: tuple[str, ...] | None = None
    to_config: Callable[[Any], Any] | None = None  # a flag's unit -> the config value
    metavar: str | None = None
    group: str = ""                    # a key of GROUPS: its section of --help and of the options table
    # False: the command line (or create_app's config) only, never KERAS_SERVE_*: a trust decision an
    # operator makes by hand each time, which no deployment's environment may make for them.
    read_from_environment: bool = True

    def __post_init__(self) -> None:
        if not self.group:  # declared without one: guessed from its name
            object.__setattr__(self, "group", default_group(self.name))
        if self.group not in GROUPS:
            raise ValueError(f"setting {self.name}: unknown group {self.group!r} (one of {', '.join(GROUPS)})")

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}_{self.name}"


# The sections of `python app.py --help` and of the options table, in this order.
GROUPS: dict[str, str] = {
    "serving": "where the server listens, how it runs requests, how it logs and stops",
    "model": "what is served and how it answers",
    "storage": "where uploads and their records are kept, and for how long",
    "limits": "what one request or client may take; more is refused with a clear error",
    "access": "who may upload (API tokens), how often (rate limits), and who the client is behind a proxy",
    "review": "the reviewer's page /review, its API and visitors' \"Was this right?\" answers "
              "(off unless an admin token is set)",
}
# For a setting declared without a group: the first matching name prefix, else serving.
_GROUP_BY_PREFIX = (("MODEL", "model"), ("CANDIDATE", "model"), ("UPLOAD", "storage"), ("STORE", "storage"),
                    ("DATABASE", "storage"), ("IMAGE_STORE", "storage"), ("MAX", "limits"), ("API", "access"),
                    ("RATE_LIMIT", "access"), ("ADMIN", "review"), ("REVIEW", "review"), ("FEEDBACK", "review"))


def default_group(name: str) -> str:
    return next((group for prefix, group in _GROUP_BY_PREFIX if name.startswith(prefix)), "serving")


def _mb_to_bytes(mb: float) -> int:
    return int(mb * 1024 * 1024)


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "0.0.0.0", "address to listen on", flag="--host", group="serving"),
    Setting("PORT", 8080, "port to listen on", int, flag="--port", group="serving"),
    Setting("MODEL_PATH", str(DEFAULT_MODEL_PATH),
            "model file, .h5 or .keras (default: the shipped cat/dog model)", flag="--model", metavar="FILE",
            group="model"),
    Setting("LABELS", None, "output labels: comma list or a file with one per line (default: model card)",
            _optional_str, flag="--labels", group="model"),
    Setting("SCALING", None, "pixel scaling (default: model card, else 1/255)", _optional_str,
            flag="--scaling", choices=tuple(SCALINGS), group="model"),
    Setting("ARCH", None, "architecture name for a weights-only .h5 file (see keras_serve/model/architectures.py)",
            _optional_str, flag="--arch", group="model"),
    Setting("UPLOAD_DIR", str(PROJECT_ROOT / "uploads"), "where uploads and their predictions are stored",
            flag="--upload-dir", metavar="DIR", group="storage"),
    Setting("UPLOAD_RETENTION_DAYS", 30.0, "uploads older than this are deleted at start-up and every hour "
            "(0: keep all)", float, flag="--retention-days", group="storage"),
    Setting("UPLOAD_FSYNC", False, "fsync every upload (image file and SQLite commit) before answering, so it "
            "survives power loss", _bool, flag="--fsync-uploads", group="storage"),
    Setting("DATABASE_URL", None, "where upload records go: a SQLAlchemy URL such as "
            "postgresql+psycopg://user@host/db (default: SQLite, UPLOAD_DIR/uploads.db)",
            _optional_str, flag="--database-url", metavar="URL", group="storage"),
    Setting("IMAGE_STORE", None, "where upload images go: s3://bucket/prefix, endpoint and credentials from "
            "the AWS_* environment (default: files under UPLOAD_DIR)", _optional_str, flag="--image-store",
            metavar="URL", group="storage"),
    Setting("UPLOAD_ORPHAN_MINUTES", 15.0, "an image with no record older than this is moved to the quarantine "
            "with retention (a crash between image and record); never while the image store belongs to another "
            "database or the database has no uploads (docs/storage-faults.md)", float, group="storage"),
    Setting("UPLOAD_QUARANTINE_DAYS", 7.0, "orphaned images stay in the quarantine this long before retention "
            "deletes them (0: keep them until `python -m keras_serve.storage quarantine --empty`)", float,
            group="storage"),
    Setting("STORE_CONNECT_TIMEOUT_S", 2.0, "seconds to open a connection to PostgreSQL or S3 (PostgreSQL "
            "counts at least 2)", float, flag="--store-connect-timeout", metavar="SECONDS", group="storage"),
    Setting("STORE_TIMEOUT_S", 3.0, "seconds one database statement or S3 request may wait for an answer; a "
            "store that does not answer within this is treated as down: uploads get 503 at once and /readyz "
            "is 503 until a background check succeeds", float, flag="--store-timeout", metavar="SECONDS",
            group="storage"),
    Setting("STORE_ATTEMPTS", 2, "tries per S3 request, the first included (botocore standard retry mode)", int,
            group="storage"),
    Setting("STORE_CHECK_INTERVAL_S", 2.0, "how often a background thread checks the database and the image "
            "store for /readyz", float, group="storage"),
    Setting("MAX_CONTENT_LENGTH", 16 * 1024 * 1024, "largest request body (flag in MB, setting in bytes)",
            int, flag="--max-upload-mb", to_config=_mb_to_bytes, metavar="MB", group="limits"),
    Setting("MAX_FILES_PER_REQUEST", 20, "most images in one POST /file/ (repeated 'file' parts); more is "
            "refused with 413 too_many_files. Their total size is capped by MAX_CONTENT_LENGTH. Also the most "
            "photos the upload page takes in one go (it sends each as its own request)", int,
            flag="--max-files", group="limits"),
    Setting("MAX_PIXELS", DEFAULT_MAX_PIXELS, "largest image in pixels", int, flag="--max-pixels", group="limits"),
    Setting("MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES,
            "most memory one image may take to decode, estimated from its header; more is refused with 413 "
            "(flag in MB, setting in bytes)", int, flag="--max-decode-mb", to_config=_mb_to_bytes, metavar="MB",
            group="limits"),
    Setting("DECODE_BUDGET_BYTES", 768 * 1024 * 1024,
            "memory all images being decoded at once may take; large images wait for their turn "
            "(flag in MB, setting in bytes)", int, flag="--decode-budget-mb", to_config=_mb_to_bytes, metavar="MB",
            group="limits"),
    Setting("DECODE_WAIT_SECONDS", 30.0, "how long an image may wait for decode memory before a 503", float,
            flag="--decode-wait-seconds", metavar="SECONDS", group="limits"),
    Setting("BATCHING", "auto", "auto: batch concurrent requests only if, measured at start-up on the loaded model, "
            "a batched forward pass saves enough per image (GPUs, bigger models); off: the forward pass runs in "
            "the request thread; on: always batch", flag="--batching", choices=("auto", "on", "off"), group="serving"),
    Setting("MAX_BATCH", 32, "largest inference batch", int, flag="--max-batch", group="serving"),
    Setting("MAX_WAIT_MS", 2.0, "how long a forming batch waits for requests still decoding", float,
            flag="--max-wait-ms", group="serving"),
    Setting("UNSURE_BELOW", 0.85, "an answer whose winning score is under this is marked \"unsure\": true "
            "(0: never); the default comes from the shipped model's validation photos, see docs/unsure.md",
            float, flag="--unsure-below", group="model"),
    Setting("MODEL_CHECK_INTERVAL_S", 2.0, "how often each server process looks in the database for a newly "
            "promoted model version and swaps to it without a restart (docs/model-versions.md); 0: never", float,
            flag="--model-check-interval", metavar="SECONDS", group="model"),
    # Model files are inspected before anything deserializes them (keras_serve/model/file_safety.py).
    Setting("MODEL_MAX_WEIGHT_BYTES", DEFAULT_MAX_WEIGHT_BYTES, "a model file whose weights declare more memory "
            "than this (every array's shape times its item size, read from the file's metadata) is refused "
            "before anything is allocated (flag in MB, setting in bytes)", int, flag="--model-max-weight-mb",
            to_config=_mb_to_bytes, metavar="MB", group="model"),
    Setting("TRUST_MODEL_CODE", False, "load model files without refusing Lambda bytecode and classes or "
            "functions outside Keras: for a model you wrote yourself; any file this process then loads (--model, "
            "a promoted version) may run code, and it is logged as a warning. Command line only; publishing over "
            "HTTP always refuses such files", _bool, flag="--trust-model-code", group="model",
            read_from_environment=False),
    # A candidate model is checked in a child process (keras_serve/model/candidate_check.py).
    Setting("CANDIDATE_MEMORY_MB", 4096.0, "memory a candidate model may take, beyond TensorFlow itself, while it "
            "is checked in its own process before it is published or served; more refuses it", float),
    Setting("CANDIDATE_TIMEOUT_S", 120.0, "seconds a candidate model's check may take to load it, answer the probe "
            "images and measure it; longer refuses it", float),
    Setting("CANDIDATE_MAX_SLOWDOWN", 3.0, "a candidate answering one image more than this many times slower than "
            "the served model is refused at publish and promote (the model CLI's --force skips this)", float),
    Setting("CANDIDATE_MAX_MEMORY_GROWTH", 3.0, "a candidate taking more than this many times the served model's "
            "memory to load and answer a batch is refused at publish and promote (the model CLI's --force skips "
            "this)", float),
    Setting("CANDIDATE_PROBE_DIR", None, "a folder of your own photos every candidate model must answer with "
            "probabilities, besides the built-in probe images (white, black, grey, gradients, scenes, noise)",
            _optional_str),
    Setting("HEATMAP_WAIT_SECONDS", 10.0, "heatmaps are made one at a time per process; how long a heatmap "
            "request waits for its turn before a 503", float, flag="--heatmap-wait-seconds", metavar="SECONDS",
            group="limits"),
    Setting("CONNECTION_LIMIT", 10_000, "most open client connections; capped by the open-file limit, "
            "which start-up raises to its hard limit", int, flag="--connection-limit", group="limits"),
    Setting("IDLE_TIMEOUT_S", 30.0, "close a connection with no request in flight after this many seconds",
            float, flag="--idle-timeout", group="limits"),
    Setting("HEADER_TIMEOUT_S", 30.0, "a request's headers must arrive within this many seconds (slowloris)",
            float, flag="--header-timeout", group="limits"),
    Setting("HTTP_SERVER", "waitress", "the HTTP layer: waitress (Python, every hardening rule exact) or granian "
            "(Rust connection handling; what differs is in docs/performance.md, Choosing the HTTP layer)",
            flag="--http-server", choices=("waitress", "granian"), group="serving"),
    Setting("SHUTDOWN_GRACE_S", 20.0, "on SIGTERM, answer the requests already received within this many "
            "seconds, then exit", float, flag="--shutdown-grace", group="serving"),
    Setting("THREADS", 64, "request threads (measured: more than 32 helps 64 clients, costs nothing at 1 or 32)",
            int, flag="--threads", group="serving"),
    Setting("ENGINE", "auto", "what runs the forward pass: auto (fastest engine whose answers match TensorFlow's), "
            "or force one; a converted engine that fails or differs falls back to tensorflow with a log line",
            flag="--engine", choices=ENGINE_CHOICES, group="model"),
    Setting("LOG_FORMAT", "auto", "log lines: json (one object per line, with the request id; see docs/api.md), "
            "text (for people), or auto: text on a terminal, else json", _log_format,
            flag="--log-format", choices=LOG_FORMATS, group="serving"),
    Setting("ADMIN_TOKEN", None, "the admin credential for /review and /api/uploads (at least 16 characters; "
            "unset: review is off and its routes answer 404); environment only, never a flag, so it stays out of "
            "`ps`", _optional_str, group="review"),
    Setting("ADMIN_TOKEN_FILE", None, "a file holding ADMIN_TOKEN (a Docker or Kubernetes secret)",
            _optional_str, flag="--admin-token-file", metavar="FILE", group="review"),
    Setting("ADMIN_SESSION_HOURS", 12.0, "a reviewer's browser login lasts this long", float, group="review"),
    Setting("FEEDBACK_PER_HOUR", 30, "most \"Was this right?\" answers one client address may send in an hour",
            int, group="review"),
    Setting("WORKERS", "auto", "server processes, each with its own model and batcher, sharing the port "
            "(auto: one per usable CPU, affinity and cgroup CPU quota respected, fewer if the memory available "
            "would not hold them at about 750 MiB plus the decode budget each, said at start-up; 1: one "
            "process; more: gunicorn forks them, each serving as one process does; see docs/performance.md)",
            parse_workers, flag="--workers", metavar="N|auto", group="serving"),
    # Access control for programs (keras_serve/web/access.py, docs/access-control.md); all off by default.
    # No flag for API_TOKENS: a command line is readable by every user of the machine (ps).
    Setting("API_TOKENS", None, "API tokens that POST /file/ accepts, comma-separated (environment only; "
            "prefer API_TOKENS_FILE). Set: a request without a valid 'Authorization: Bearer' token gets 401",
            _optional_str, group="access"),
    Setting("API_TOKENS_FILE", None, "file with one API token per line (# comments ignored), read again when "
            "it changes; adds to API_TOKENS", _optional_str, flag="--api-tokens-file", metavar="FILE", group="access"),
    Setting("ALLOW_ANONYMOUS_UPLOADS", False, "with API tokens set, still accept uploads without a token (the "
            "browser form sends none; so can any script): limited per client address. Off: the form page "
            "says a token is needed", _bool, flag="--allow-anonymous-uploads", group="access"),
    Setting("RATE_LIMIT", None, "uploads (POST /file/) allowed per API token, or per client address without "
            "one, e.g. 60/minute or '10/second;500/hour'; more get 429 with Retry-After (default: no limit)",
            _optional_str, flag="--rate-limit", metavar="LIMIT", group="access"),
    Setting("RATE_LIMIT_STORAGE_URI", "memory://", "where rate-limit counts live: memory:// counts in each "
            "process (--workers N allows N times the limit); redis://host:port/db is one count for every "
            "process and replica", flag="--rate-limit-storage", metavar="URI", group="access"),
    Setting("TRUSTED_PROXIES", 0, "reverse proxies in front that append the client to X-Forwarded-For and set "
            "X-Forwarded-Proto; the client address (rate limit, admin login backoff, feedback quota) and the "
            "scheme are read that many entries from their right (0: the connection's own, every forwarded "
            "header ignored)", int, flag="--trusted-proxies", metavar="N", group="access"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def defaults() -> dict[str, Any]:
    return {s.name: s.default for s in SETTINGS}


def resolve(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every setting: its default, then KERAS_SERVE_*, then `given` (flags or create_app's config)."""
    return {**defaults(), **from_environment(), **(given or {})}


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Typed values of the KERAS_SERVE_* variables that are set; raises ValueError naming a bad one."""
    environ = os.environ if environ is None else environ
    values = {}
    for s in SETTINGS:
        if s.read_from_environment and s.env in environ:
            try:
                values[s.name] = s.parse(environ[s.env])
            except ValueError as exc:
                raise ValueError(f"{s.env}: {exc}") from None
    return values


def flag_default(s: Setting) -> str:
    """The default as the flag takes it: 16 for --max-upload-mb, not the 16777216 bytes it sets."""
    if s.to_config is _mb_to_bytes and isinstance(s.default, (int, float)):
        return f"{s.default / (1024 * 1024):g}"
    return str(s.default)


def _default_note(s: Setting) -> str:
    """'default X' for --help; empty where there is none or the help text gives it already."""
    if s.default is None or "(default:" in s.help:
        return ""
    return f"default {flag_default(s)}{' MB' if s.to_config is _mb_to_bytes else ''}"


def _flag_help(s: Setting) -> str:
    unit = ", in bytes" if s.to_config is _mb_to_bytes else ""  # the variable holds the setting's bytes
    env = f"env {s.env}{unit}" if s.read_from_environment else "command line only"
    return f"{s.help} ({'; '.join(filter(None, (_default_note(s), env)))})"


def _group_description(about: str, env_only: list[Setting], width: int = 76) -> str:
    """A group's head in --help, naming its settings that have no flag (the admin token among
    them). Wrapped here: the parser prints descriptions as written."""
    lines = textwrap.wrap(about, width)
    if env_only:
        lines.append("environment only (no flag):")
    for s in env_only:
        note = _default_note(s)
        lines += textwrap.wrap(f"{s.env}: {s.help}" + (f" ({note})" if note else ""), width, initial_indent="  ",
                               subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)


HELP_EPILOG = (f"Every setting is also read from its {ENV_PREFIX}_* environment variable (env above) when its "
               f"flag is not given; a flag wins. Every default, in a table: docs/reference.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting's flag, in one argument group per GROUPS entry; the settings without a
    flag (the admin token among them) are named in their group's description."""
    for group_name, about in GROUPS.items():
        members = [s for s in SETTINGS if s.group == group_name]
        if not members:
            continue
        group = parser.add_argument_group(group_name, _group_description(about, [s for s in members if not s.flag]))
        for s in members:
            if s.flag is not None:
                _add_flag(group, s)


def _add_flag(group: argparse._ArgumentGroup, s: Setting) -> None:
    kwargs: dict[str, Any] = {"dest": s.name, "default": None, "metavar": s.metavar, "help": _flag_help(s)}
    if s.parse is _bool:
        kwargs.pop("metavar")
        group.add_argument(s.flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if s.to_config is _mb_to_bytes:
        kwargs["type"] = float
    elif s.parse not in (str, _optional_str):
        kwargs["type"] = s.parse
    if s.choices:
        kwargs["choices"] = s.choices
        kwargs.pop("metavar")
    group.add_argument(s.flag, **kwargs)


def from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Only the settings given on the command line, as config values (so env values survive)."""
    values = {}
    for s in SETTINGS:
        value = getattr(args, s.name, None)
        if value is not None:
            values[s.name] = s.to_config(value) if s.to_config else value
    return values


def markdown_table() -> str:
    """The options table of docs/reference.md: one table per group, as in --help."""
    parts = []
    for group_name, about in GROUPS.items():
        members = [s for s in SETTINGS if s.group == group_name]
        if not members:
            continue
        rows = [f"### {group_name.capitalize()}", "", f"{about[0].upper()}{about[1:]}.", "",
                "| setting | flag | environment | default | what it does |", "|---|---|---|---|---|"]
        for s in members:
            default = "the shipped cat/dog model" if s.name == "MODEL_PATH" else (
                "./uploads" if s.name == "UPLOAD_DIR" else s.default)
            shown = f"`{default}`"
            if s.to_config is _mb_to_bytes:
                shown += f" bytes (`{s.flag} {flag_default(s)}`)"
            env = f"`{s.env}`" if s.read_from_environment else "-"
            rows.append(f"| `{s.name}` | {f'`{s.flag}`' if s.flag else '-'} | {env} | {shown} | {s.help} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(markdown_table())
