"""The maintenance commands take their options where people type them, and never make a store
they were only meant to read.

`python -m keras_serve.storage` and `python -m keras_serve.model`: the store's options (and the
model command's --model, --labels, --by) go before or after the subcommand, with the same
effect; a command on a store that does not exist says so, exits with status 1 and creates
nothing (no uploads.db, no folder).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from images import RED, image_bytes

ROOT = Path(__file__).resolve().parent.parent

# Each subcommand with the arguments it needs to parse.
STORAGE_COMMANDS = {
    "export": [],
    "import-dayfiles": ["old/"],
    "copy-to": ["--to-database-url", "sqlite:////tmp/elsewhere.db"],
    "export-dataset": ["out/"],
    "prune": [],
    "quarantine": [],
    "claim-image-store": [],
}
MODEL_COMMANDS = {
    "promote": ["candidate.h5"],
    "publish": ["candidate.h5"],
    "rollback": [],
    "list": [],
    "optimize": ["model.h5", "--calibrate", "photos/"],
}
STORE_OPTIONS = ["--upload-dir", "/srv/uploads", "--database-url", "sqlite:////srv/u.db", "--image-store", "s3://b/p"]
STORE_CONFIG = {"UPLOAD_DIR": "/srv/uploads", "DATABASE_URL": "sqlite:////srv/u.db", "IMAGE_STORE": "s3://b/p"}
MODEL_OPTIONS = [*STORE_OPTIONS, "--model", "served.h5", "--labels", "CAT,DOG", "--by", "alice"]


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def storage_parser() -> argparse.ArgumentParser:
    from keras_serve.storage.__main__ import build_parser

    return build_parser()


def model_parser() -> argparse.ArgumentParser:
    from keras_serve.model.__main__ import build_parser

    return build_parser()


def test_every_subcommand_is_covered_here():
    # A new subcommand must join the tables above, so that its options are tested in both places.
    assert subcommands(storage_parser()) == set(STORAGE_COMMANDS)
    assert subcommands(model_parser()) == set(MODEL_COMMANDS)


@pytest.mark.parametrize("command", sorted(STORAGE_COMMANDS))
def test_storage_options_before_or_after_the_subcommand_choose_the_same_store(command, monkeypatch):
    from keras_serve.storage.__main__ import config_from_args

    for name in STORE_CONFIG:
        monkeypatch.delenv(f"KERAS_SERVE_{name}", raising=False)
    parser, args = storage_parser(), STORAGE_COMMANDS[command]
    before = parser.parse_args([*STORE_OPTIONS, command, *args])
    after = parser.parse_args([command, *args, *STORE_OPTIONS])
    for parsed in (before, after):
        config = config_from_args(parsed)
        assert {name: config[name] for name in STORE_CONFIG} == STORE_CONFIG
    assert vars(before) == vars(after)
    # given before the subcommand and not after: the subcommand's copy leaves it alone
    mixed = parser.parse_args(["--upload-dir", "/first", command, *args, "--image-store", "s3://c/q"])
    assert (mixed.UPLOAD_DIR, mixed.IMAGE_STORE) == ("/first", "s3://c/q")


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_model_options_before_or_after_the_subcommand_mean_the_same(command):
    parser, args = model_parser(), MODEL_COMMANDS[command]
    before = parser.parse_args([*MODEL_OPTIONS, command, *args])
    after = parser.parse_args([command, *args, *MODEL_OPTIONS])
    assert vars(before) == vars(after)
    assert (after.UPLOAD_DIR, after.DATABASE_URL, after.IMAGE_STORE) == tuple(STORE_CONFIG.values())
    assert (after.MODEL_PATH, after.LABELS, after.by) == ("served.h5", "CAT,DOG", "alice")


def test_an_option_given_twice_takes_the_one_after_the_subcommand():
    parsed = storage_parser().parse_args(["--upload-dir", "/before", "export", "--upload-dir", "/after"])
    assert parsed.UPLOAD_DIR == "/after"


# --- on a real store ------------------------------------------------------------------------

@pytest.fixture()
def store_dir(tmp_path, monkeypatch):
    """An upload folder with one upload in it, as a server leaves it; no KERAS_SERVE_* store variables."""
    from keras_serve.storage.uploads import UploadStore

    for name in STORE_CONFIG:
        monkeypatch.delenv(f"KERAS_SERVE_{name}", raising=False)
    folder = tmp_path / "uploads"
    store = UploadStore.from_config({"UPLOAD_DIR": str(folder)})
    store.save(image_bytes(RED, fmt="PNG"), "PNG", {"prediction": {"class": "DOG"}, "model": "m.h5"})
    store.close()
    return folder


def storage(*args: str) -> int:
    from keras_serve.storage.__main__ import main

    return main(list(args))


@pytest.mark.parametrize("command, args", [
    ("export", ["--format", "csv"]),
    ("prune", []),
    ("quarantine", []),
    ("claim-image-store", []),
])
def test_each_storage_command_works_with_the_store_named_after_it(command, args, store_dir, capsys):
    assert storage(command, *args, "--upload-dir", str(store_dir)) == 0
    if command == "export":
        out, err = capsys.readouterr()
        assert "exported 1 uploads" in err and out.count("\n") == 2  # header and the one upload


def test_export_dataset_with_the_upload_dir_after_the_output_folder(store_dir, tmp_path, capsys):
    out = tmp_path / "reviewed"
    # the form people type, which argparse used to refuse ("unrecognized arguments")
    assert storage("export-dataset", str(out), "--upload-dir", str(store_dir), "--reviewed-only") == 0
    assert (out / "manifest.csv").is_file()
    assert f"{out}: 0 written" in capsys.readouterr().err  # the upload was never reviewed


def test_copy_to_and_import_dayfiles_with_options_after(store_dir, tmp_path):
    target = tmp_path / "target"
    assert storage("copy-to", "--to-database-url", f"sqlite:///{target / 'copy.db'}", "--to-upload-dir", str(target),
                   "--upload-dir", str(store_dir)) == 0
    assert (target / "copy.db").is_file()
    (tmp_path / "old").mkdir()
    # import-dayfiles fills a store, so it may make a new one
    assert storage("import-dayfiles", str(tmp_path / "old"), "--upload-dir", str(tmp_path / "fresh")) == 0
    assert (tmp_path / "fresh" / "uploads.db").is_file()


def test_model_list_with_the_store_named_after_it(store_dir, capsys):
    from keras_serve.model.__main__ import main

    assert main(["list", "--upload-dir", str(store_dir), "--by", "alice"]) == 0
    assert '"versions": []' in capsys.readouterr().out


# --- a store that does not exist -------------------------------------------------------------

def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


READING_STORAGE_COMMANDS = sorted(set(STORAGE_COMMANDS) - {"import-dayfiles"})


@pytest.mark.parametrize("command", READING_STORAGE_COMMANDS)
@pytest.mark.parametrize("where", ["missing folder", "empty folder"])
def test_a_storage_command_on_a_missing_store_says_so_and_creates_nothing(command, where, tmp_path, capsys,
                                                                          monkeypatch):
    for name in STORE_CONFIG:
        monkeypatch.delenv(f"KERAS_SERVE_{name}", raising=False)
    folder = tmp_path / "uploads"
    if where == "empty folder":
        folder.mkdir()
    monkeypatch.chdir(tmp_path)  # export-dataset's out/ and copy-to's target are relative: they must not appear
    before = tree(tmp_path)
    assert storage(command, *STORAGE_COMMANDS[command], "--upload-dir", str(folder)) == 1
    err = capsys.readouterr().err
    assert f"error: no upload store in {folder}" in err and "start the server once" in err
    assert tree(tmp_path) == before  # no uploads.db, no folders, no export


@pytest.mark.parametrize("command", ["promote", "publish", "rollback", "list"])
def test_a_model_command_on_a_missing_store_says_so_and_creates_nothing(command, tmp_path, capsys, monkeypatch):
    from keras_serve.model.__main__ import main

    monkeypatch.delenv("KERAS_SERVE_DATABASE_URL", raising=False)
    monkeypatch.setenv("KERAS_SERVE_UPLOAD_DIR", str(tmp_path / "typo"))  # the environment's store, this time
    (tmp_path / "candidate.h5").write_bytes(b"not looked at")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main([command, *MODEL_COMMANDS[command]]) == 1
    assert f"error: no upload store in {tmp_path / 'typo'}" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_a_database_url_without_the_schema_is_no_store_either(tmp_path, capsys, monkeypatch):
    import sqlite3

    monkeypatch.delenv("KERAS_SERVE_IMAGE_STORE", raising=False)
    empty = tmp_path / "other.db"
    sqlite3.connect(empty).close()  # a database, but not one a server made
    assert storage("export", "--database-url", f"sqlite:///{empty}", "--upload-dir", str(tmp_path / "images")) == 1
    assert "no uploads table" in capsys.readouterr().err
    assert not (tmp_path / "images").exists()
    assert sqlite3.connect(empty).execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_the_command_line_of_the_report(tmp_path):
    """The report's exact command, as a process: refused, and nothing appears."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_SERVE_")}
    done = subprocess.run([sys.executable, "-m", "keras_serve.storage", "export-dataset", str(tmp_path / "out"),
                           "--upload-dir", str(tmp_path / "uploads")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "unrecognized arguments" not in done.stderr
    assert "no upload store in" in done.stderr
    assert list(tmp_path.iterdir()) == []
