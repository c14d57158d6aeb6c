"""Classify every image in some folders with a running server, into CSV or JSON lines.

    python -m keras_serve.client http://localhost:8080 photos/ more/ --out answers.csv
    python -m keras_serve.client http://localhost:8080 photos/ --format jsonl --out answers.jsonl --concurrency 8

A row per file: path, status (ok or error), label, confidence, unsure, id, model_version, and
for an error its http_status, error_code and error_message. Run it again with the same --out
and only the files without an answer are sent (errors are tried again). With API tokens on,
the token comes from the environment variable KERAS_SERVE_API_TOKEN (never a flag, which
would show in the process list). Exit status: 0 when every file was classified, 1 when any
was not (its row says why), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_serve.client.folder import Summary, classify_folder
from keras_serve.client.http import TOKEN_ENV, Client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keras_serve.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server, e.g. http://localhost:8080")
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR",
                        help="folders (their images, recursively) or image files")
    parser.add_argument("--out", type=Path, help="the output file, appended to and resumed "
                                                 "(default: standard output, no resume)")
    parser.add_argument("--format", choices=["csv", "jsonl"],
                        help="default: jsonl for an --out ending in .jsonl, else csv")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N",
                        help="images in flight at once (default 4)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="longest wait for one answer (default 120)")
    parser.add_argument("--retries", type=int, default=3,
                        help="tries again after a 429 or 503, waiting what the server asks (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on a terminal")
    parser.epilog = f"environment: {TOKEN_ENV} the API token, when the server needs one"
    return parser


class Progress:
    """`\\r120/340 sent, 2 errors` on stderr, only on a terminal (a log file gets the summary only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, summary: Summary, total: int) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{summary.sent}/{total} sent, {summary.errors} errors")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    client = Client(args.url, timeout_s=args.timeout, retries=args.retries)
    progress = Progress(not args.quiet and sys.stderr.isatty())
    try:
        summary = classify_folder(client, args.paths, args.out, args.format, args.concurrency, progress)
    except ValueError as exc:  # an --out that is not this command's output
        parser.error(str(exc))
    except KeyboardInterrupt:
        progress.close()
        print("interrupted: the rows written so far are kept; run again to go on", file=sys.stderr)
        return 130
    progress.close()
    print(f"{summary.classified} classified, {summary.errors} errors, {summary.skipped} already answered"
          + (f" (in {args.out})" if args.out else ""), file=sys.stderr)
    return 1 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
