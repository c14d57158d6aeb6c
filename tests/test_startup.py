"""Start-up as people meet it: a port in use fails at once and says why, a first start is quiet,
the log suits where it goes, and `--help` is grouped, in the flags' units, naming every variable.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from server_process import ROOT, ServerProcess


@pytest.mark.parametrize("http_server", ["waitress", "granian"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_fails_the_start_before_the_model_loads(workers, http_server, colour_model_path, tmp_path):
    uploads = tmp_path / "uploads"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "app.py", "--model", str(colour_model_path), "--upload-dir",
                               str(uploads), "--host", "127.0.0.1", "--port", str(port), "--workers", workers,
                               "--http-server", http_server],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "), output
    assert "--port" in done.stderr  # what to do about it
    assert "serving on" not in output
    # nothing was loaded or opened: no model summary, no log line, no upload store
    assert "model colour.h5" not in output and "worker" not in output and "{" not in output
    assert not uploads.exists()


@pytest.mark.parametrize("host, port, why", [
    ("no-such-host.invalid", "8080", "no-such-host.invalid is not a host name or address of this machine"),
    ("127.0.0.1", "99999", "port 99999 is not between 0 and 65535"),  # the resolver would take 34463
])
def test_an_address_that_cannot_be_had_fails_the_same_way(host, port, why, colour_model_path, tmp_path):
    done = subprocess.run([sys.executable, "app.py", "--model", str(colour_model_path), "--upload-dir",
                           str(tmp_path / "uploads"), "--host", host, "--port", port],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot listen on {host}:{port}: {why}; ")
    assert "serving on" not in done.stdout and not (tmp_path / "uploads").exists()


@pytest.mark.parametrize("http_server", ["waitress", "granian"])
def test_a_first_start_on_an_empty_folder_logs_no_warning_and_json_when_piped(http_server, colour_model_path,
                                                                              tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    env = {"KERAS_SERVE_LOG_FORMAT": "auto"}  # the default, whatever the test runner's environment says
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(uploads), "--http-server", http_server,
                       env=env) as server:
        pass
    lines = server.stop().splitlines()
    assert not [line for line in lines if "WARNING" in line], lines
    # Not a terminal (a pipe): every log line is a JSON object; the two start-up lines stay plain text.
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(record["logger"] == "keras_serve.access" for record in logged)
    plain = [line for line in lines if not line.startswith("{")]
    assert [line.split(" ")[0] for line in plain] == ["model", "serving"], plain
    assert lines.index(next(line for line in plain if line.startswith("serving on"))) > \
        lines.index(next(line for line in plain if line.startswith("model ")))


def test_the_orphan_sweep_still_warns_when_an_empty_database_meets_images(tmp_path, caplog):
    """The warning that a first start no longer gives is kept for the case it is for: a
    database with no uploads in front of an image store that has some (a wrong URL, a lost database)."""
    from keras_serve.storage.uploads import UploadStore

    store = UploadStore.from_config({"UPLOAD_DIR": str(tmp_path)})
    try:
        with caplog.at_level("WARNING", logger="keras_serve.storage.uploads"):
            assert "has no uploads at all" in store.sweep_refusal()
            assert caplog.records == []
            store.images.put("2026/12/01/" + "ab" * 16 + ".png", b"someone's image", "image/png")
            assert "has no uploads at all" in store.sweep_refusal()
        assert [r.getMessage().startswith("orphan sweep skipped") for r in caplog.records] == [True]
    finally:
        store.close()


class FakeStream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_the_log_is_text_at_a_terminal_and_json_elsewhere_unless_asked():
    from keras_serve.cli import log_format_for
    from keras_serve.settings import BY_NAME

    assert BY_NAME["LOG_FORMAT"].default == "auto"
    assert log_format_for("auto", FakeStream(terminal=True)) == "text"
    assert log_format_for("auto", FakeStream(terminal=False)) == "json"
    assert log_format_for("json", FakeStream(terminal=True)) == "json"
    assert log_format_for("text", FakeStream(terminal=False)) == "text"
    closed = io.StringIO()
    closed.close()
    assert log_format_for("auto", closed) == "json"  # isatty() raises on a closed stream
    assert log_format_for("auto", None) == "json"  # no stderr at all (pythonw, some daemons)


# --- --help -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def help_text() -> str:
    done = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def sections(help_text: str) -> dict[str, str]:
    """--help's sections by title (a line 'title:' at the left margin)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        if re.fullmatch(r"[a-z][a-z ]*:", line):
            current = line[:-1]
            found[current] = []
        elif current:
            found[current].append(line)
    return {title: "\n".join(lines) for title, lines in found.items()}


def test_help_groups_the_flags_as_the_settings_table_does(help_text):
    from keras_serve.settings import GROUPS, SETTINGS

    by_title = sections(help_text)
    assert [title for title in by_title if title in GROUPS] == list(GROUPS)
    for s in SETTINGS:
        if s.flag:
            assert re.search(rf"^  {re.escape(s.flag)}[ ,\n]", by_title[s.group], re.MULTILINE), (s.flag, s.group)


def test_help_names_every_environment_variable_the_admin_token_included(help_text):
    from keras_serve.settings import SETTINGS

    by_title = sections(help_text)
    words = set(re.findall(r"KERAS_SERVE_[A-Z0-9_]+", help_text))
    assert {s.env for s in SETTINGS if getattr(s, "read_from_environment", True)} <= words
    assert "KERAS_SERVE_ADMIN_TOKEN:" in by_title["review"]  # no flag: listed under its group
    assert "KERAS_SERVE_API_TOKENS:" in by_title["access"]


def test_help_shows_sizes_in_the_unit_the_flag_takes(help_text):
    flat = " ".join(help_text.split())
    assert "--max-upload-mb MB largest request body" in flat
    assert "(default 16 MB; env KERAS_SERVE_MAX_CONTENT_LENGTH, in bytes)" in flat
    assert "(default 768 MB; env KERAS_SERVE_DECODE_BUDGET_BYTES, in bytes)" in flat
    assert "16777216" not in flat and "805306368" not in flat


def test_a_setting_declared_without_a_group_gets_one():
    from keras_serve.settings import Setting

    assert Setting("SOMETHING_NEW", 1, "new").group == "serving"
    assert Setting("UPLOAD_SOMETHING", 1, "new").group == "storage"
    assert Setting("CANDIDATE_SOMETHING", 1, "new").group == "model"
    assert Setting("ADMIN_SOMETHING", 1, "new", group="access").group == "access"
    with pytest.raises(ValueError, match="unknown group 'servng'"):
        Setting("TYPO", 1, "new", group="servng")


def test_the_options_table_is_grouped_and_gives_sizes_in_both_units():
    from keras_serve.settings import GROUPS, markdown_table

    table = markdown_table()
    assert [line[4:].lower() for line in table.splitlines() if line.startswith("### ")] == list(GROUPS)
    assert "| `MAX_CONTENT_LENGTH` | `--max-upload-mb` | `KERAS_SERVE_MAX_CONTENT_LENGTH` | `16777216` bytes " \
           "(`--max-upload-mb 16`) |" in table
