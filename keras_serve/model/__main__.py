"""Model versions, with the same settings as the server (docs/model-versions.md).

    python -m keras_serve.model promote candidate.h5     check, publish and serve it everywhere
    python -m keras_serve.model promote <sha256>          serve a version published before
    python -m keras_serve.model rollback                  back to what served before the last promotion
    python -m keras_serve.model publish candidate.h5      check and publish, not served yet
    python -m keras_serve.model list                      versions, which one serves, the log
    python -m keras_serve.model optimize MODEL.h5 --calibrate DIR   write its int8 variant and card

A file is checked as every server will check it (it loads with the server's settings, its
converted engine answers as TensorFlow does, its labels are the served model's, its answers to
real-looking probe images are probabilities) in a child process within CANDIDATE_MEMORY_MB and
CANDIDATE_TIMEOUT_S, and compared with the served model (at most CANDIDATE_MAX_SLOWDOWN times
slower per image and CANDIDATE_MAX_MEMORY_GROWTH times the memory; --force skips only this
comparison) before it is published or promoted; a refused one prints why and exits with status
2. The database and image store are chosen like the server's: --upload-dir, --database-url,
--image-store, or KERAS_SERVE_* variables; --model is the model the servers were started with.
Options go before or after the command. A command on a store that does not exist (no server has
used it) says so and exits with status 1, creating nothing. Every server process sharing the
database swaps to a promoted version within MODEL_CHECK_INTERVAL_S plus the time it takes to
load it.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Iterable

from keras_serve.errors import ModelVersionError, StorageError
from keras_serve.storage.__main__ import (STORE_OPTIONS, add_store_arguments, config_from_args, open_existing_store,
                                          options_after_commands_too)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The store's options and the served model's, on the main parser and every command (SUPPRESS:
    a command's own copy must not overwrite a value given before the command)."""
    add_store_arguments(parser)
    group = parser.add_argument_group("the served model (as the servers were started)")
    group.add_argument("--model", dest="MODEL_PATH", metavar="FILE", default=argparse.SUPPRESS,
                       help="the model the servers were started with (env KERAS_SERVE_MODEL_PATH)")
    group.add_argument("--labels", dest="LABELS", default=argparse.SUPPRESS,
                       help="the servers' --labels, if they were given (env KERAS_SERVE_LABELS)")
    group.add_argument("--by", default=argparse.SUPPRESS, help="who does it, for the log (default: your user name)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keras_serve.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    promote = sub.add_parser("promote", help="serve a model file (checked and published first) or a published sha256")
    promote.add_argument("candidate")
    publish = sub.add_parser("publish", help="check and publish a model file without serving it")
    publish.add_argument("candidate", type=Path)
    for command in (promote, publish):
        command.add_argument("--force", action="store_true",
                             help="accept it even if it is slower or takes more memory than the served model "
                                  "allows (CANDIDATE_MAX_SLOWDOWN, CANDIDATE_MAX_MEMORY_GROWTH), or its card "
                                  "marks it not promotable (an int8 variant that lost accuracy); every other "
                                  "check still applies")
        command.add_argument("--trust-model-code", action="store_true",
                             help="check it without refusing Lambda bytecode or classes and functions outside "
                                  "Keras: only for a model you wrote yourself, which may then run code here and "
                                  "in every server started with --trust-model-code (command line only)")
    sub.add_parser("rollback", help="serve what served before the promotion in effect")
    sub.add_parser("list", help="published versions, the one served, and the log (JSON)")
    from keras_serve.model.quantize_cli import add_optimize_parser

    add_optimize_parser(sub)
    options_after_commands_too(parser, sub, add_common_arguments)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "optimize":  # makes a file; needs no database or image store
        from keras_serve.model.quantize_cli import optimize_main

        return optimize_main(args)

    from keras_serve.model.versions import promote_version, publish_candidate, refuse_unpromotable
    from keras_serve.storage.model_registry import ModelRegistry, is_sha256

    config = config_from_args(args, (*STORE_OPTIONS, "MODEL_PATH", "LABELS"))
    if getattr(args, "trust_model_code", False):  # this flag only: never the environment
        from keras_serve.model.file_safety import TRUST_WARNING

        config["TRUST_MODEL_CODE"] = True
        print(f"WARNING: {TRUST_WARNING}", file=sys.stderr)
    by = (getattr(args, "by", None) or _user())[:64]
    # Every command works on the store the servers share: a mistyped path must not publish
    # into, or leave behind, an empty store that no server reads.
    if (store := open_existing_store(config)) is None:
        return 1
    registry = ModelRegistry(store.records, store.images)
    try:
        if args.command in ("promote", "publish"):
            candidate = str(args.candidate)
            if args.command == "promote" and is_sha256(candidate) and not Path(candidate).exists():
                version = promote_version(registry, candidate, config, by, force=args.force)
            else:
                path = Path(candidate)
                if not path.is_file():
                    print(f"error: no such model file: {path}", file=sys.stderr)
                    return 2
                version = publish_candidate(registry, path, config, by, force=args.force)
                print(f"published {version.file} ({version.sha256})", file=sys.stderr)
                if args.command == "promote":
                    refuse_unpromotable(path, version.file, args.force)
                    registry.promote(version.sha256, by)  # checked just now, as it was published
            if args.command == "promote":
                print(f"promoted {version.file} ({version.sha256[:12]}): every server swaps to it within "
                      f"{float(config['MODEL_CHECK_INTERVAL_S']):g} s plus its load time", file=sys.stderr)
        elif args.command == "rollback":
            now = registry.rollback(by)
            print("rolled back: the servers now answer with " +
                  (f"{now.file} ({now.sha256[:12]})" if now else "the model they were started with"), file=sys.stderr)
        else:
            served = registry.served()
            json.dump({"served": served.as_json() if served else None,
                       "versions": [v.as_json() for v in registry.versions()],
                       "log": registry.history()}, sys.stdout, indent=2)
            sys.stdout.write("\n")
    except ModelVersionError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in a bare container
        return "cli"


if __name__ == "__main__":
    sys.exit(main())
