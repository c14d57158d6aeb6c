"""What README.md and docs/ show is what a running server does.

- The README's example answers (the JSON of a classified photo, the JSON of a refused file)
  have exactly the keys, and the value types, of a real answer from the default model.
- Every `curl` command in a fenced block of README.md and docs/*.md that targets
  localhost:8080 runs against a real server (its files generated, its placeholders filled
  with real ids) and gets the status its page shows (200 where it shows none), never a 5xx;
  where the page shows the whole answer, it has the keys and value types of the real one.
- Every `python -m keras_serve.<x> ...` or `python app.py ...` command in a fenced block is
  accepted by that command's own option parser, exactly as shown.
- docs/reference.md's route table names every route the app has, and only those.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from images import image_bytes
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ADMIN_TOKEN = "readme-admin-token-" + "a" * 32
API_TOKEN = "kP3v9Xq2Lr8sT5wYb7Nc1Hd4Jf6Gm0Qe2Rt5Uy8Io1Pa"
# Pages whose curl commands describe a server that requires API tokens.
TOKEN_PAGES = {"access-control.md"}
TEXT = b"meeting at ten, room 4\n"


# --- reading the pages ---------------------------------------------------------------------

def fenced_blocks(text: str) -> list[list[str]]:
    """The lines of each ``` block, in order."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@dataclass
class Shown:
    page: str
    command: str          # one shell command, continuation lines joined
    output: list[str]     # the lines the page shows after it, up to the next command


def is_command(line: str) -> bool:
    body = line.strip().removeprefix("$ ").strip()
    return bool(re.match(r"(\w+=\S+\s+)*(curl|\.venv/bin/python|python)\b", body))


def shown_commands(page: Path) -> list[Shown]:
    found = []
    for block in fenced_blocks(page.read_text()):
        i = 0
        while i < len(block):
            line = block[i]
            if not is_command(line):
                i += 1
                continue
            command = line.strip().removeprefix("$ ")
            while command.endswith("\\") and i + 1 < len(block):
                i += 1
                command = command[:-1] + " " + block[i].strip()
            i += 1
            output = []
            while i < len(block) and not is_command(block[i]):
                output.append(block[i])
                i += 1
            found.append(Shown(page.name, command, output))
    return found


ALL_SHOWN = [shown for page in PAGES for shown in shown_commands(page)]
CURLS = [s for s in ALL_SHOWN if s.command.startswith("curl") and "localhost:8080" in s.command]


def readme_json(after: str) -> dict:
    """The JSON the README shows right after the command `after`."""
    (shown,) = [s for s in shown_commands(ROOT / "README.md") if s.command == after]
    return json.loads("\n".join(shown.output))


def shape(value):
    """Keys and value types, recursively; a list by the shape of its items."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


# --- the servers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The default model, as `make serve` starts it, with reviewing on."""
    uploads = tmp_path_factory.mktemp("uploads")
    with ServerProcess("--upload-dir", str(uploads), env={"KERAS_SERVE_ADMIN_TOKEN": ADMIN_TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server(colour_model_path, tmp_path_factory):
    """A server that requires API tokens, as docs/access-control.md sets one up."""
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "api-tokens").write_text(f"# docs example\n{API_TOKEN}\n")
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(folder / "uploads"),
                       "--api-tokens-file", str(folder / "api-tokens")) as srv:
        yield srv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The files the commands name, and a `curl` that reports each status on stderr."""
    folder = tmp_path_factory.mktemp("cwd")
    for name in ("cat.jpg", "photo.jpg", "a.jpg", "b.jpg"):
        (folder / name).write_bytes(image_bytes(size=(160, 120)))
    (folder / "notes.jpg").write_bytes(TEXT)
    (folder / "notes.txt").write_bytes(TEXT)
    try:
        import pillow_heif
        from PIL import Image

        pillow_heif.register_heif_opener()
        heic = io.BytesIO()
        Image.open(io.BytesIO(image_bytes(size=(160, 120)))).save(heic, format="HEIF")
        (folder / "dog.heic").write_bytes(heic.getvalue())
    except ImportError:  # the server reads the content, not the name
        (folder / "dog.heic").write_bytes(image_bytes(size=(160, 120)))
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "curl"
    wrapper.write_text("#!/bin/sh\nexec /usr/bin/curl -sS --max-time 60 "
                       "-w '%{stderr}HTTP_STATUS %{http_code}\\n' \"$@\"\n")
    wrapper.chmod(0o755)
    return folder


def upload(url: str, headers: dict | None = None) -> str:
    r = requests.post(url + "/file/", files={"file": ("x.jpg", image_bytes(size=(64, 48)))},
                      headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


# --- the README's example answers --------------------------------------------------------------

def test_the_readme_answer_has_exactly_the_keys_and_types_of_a_real_answer(default_server, workdir):
    shown = readme_json("curl -F file=@cat.jpg http://localhost:8080/file/")
    r = requests.post(default_server.url + "/file/", files={"file": ("cat.jpg", (workdir / "cat.jpg").read_bytes())},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert shape(shown) == shape(r.json())
    assert shown["model_version"] == requests.get(default_server.url + "/model", timeout=30).json()["sha256"]
    assert reference_answer_keys() == set(r.json())


def reference_answer_keys() -> set[str]:
    """The keys docs/reference.md lists in its paragraph on the JSON answer."""
    text = (ROOT / "docs" / "reference.md").read_text()
    paragraph = text.split("The JSON answer:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", paragraph))


def test_the_readme_error_has_exactly_the_keys_and_types_of_a_real_error(default_server):
    shown = readme_json("curl -F file=@notes.jpg http://localhost:8080/file/")
    r = requests.post(default_server.url + "/file/", files={"file": ("notes.jpg", TEXT)}, timeout=60)
    assert r.status_code == shown["error"]["status"] == 415
    assert shape(shown) == shape(r.json())
    assert {k: v for k, v in shown["error"].items() if k != "request_id"} == \
        {k: v for k, v in r.json()["error"].items() if k != "request_id"}


# --- every curl command ------------------------------------------------------------------------

def expected_status(shown: Shown) -> int:
    for line in shown.output:
        if m := re.match(r"HTTP/1\.[01] (\d{3})", line.strip()):
            return int(m.group(1))
    text = "\n".join(shown.output).strip()
    if m := re.match(r'\{"error":\s*\{.*?"status":\s*(\d{3})', text, re.DOTALL):
        return int(m.group(1))
    if text.startswith('{"error"'):
        pytest.fail(f"{shown.page}: an error example without its status: {text[:80]}")
    return 200


def fill_placeholders(command: str, url: str, headers: dict, version: str) -> str:
    command = command.replace("http://localhost:8080", url)
    for placeholder in ("<id>", "<id1>", "<id2>"):
        while placeholder in command:  # a fresh upload each: one decision per upload
            command = command.replace(placeholder, upload(url, headers), 1)
    command = command.replace("<sha256>", version)
    if "cursor=" in command:  # the page's cursor is cut short; a real one from a first page
        upload(url, headers), upload(url, headers)
        first = requests.get(url + "/api/uploads?order=least_sure&reviewed=no&limit=1", headers=headers,
                             timeout=30).json()
        command = re.sub(r"cursor=[^\"'&\s]+", "cursor=" + first["next_cursor"], command)
    return command


def run_curl(command: str, cwd: Path, env: dict) -> tuple[list[int], str]:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "PATH": f"{cwd / 'bin'}:{Path(sys.executable).parent}:"
                                                             f"{os.environ['PATH']}"})
    statuses = [int(s) for s in re.findall(r"HTTP_STATUS (\d{3})", done.stderr)]
    assert statuses, f"{command}: curl did not run\n{done.stderr}"
    return statuses, done.stdout


def shown_json(shown: Shown):
    """The answer the page shows, when it shows one whole (not cut short with "...")."""
    try:
        return json.loads("\n".join(shown.output))
    except ValueError:
        return None


def test_every_curl_command_in_the_docs_answers_as_shown(default_server, token_server, workdir):
    assert len(CURLS) >= 15, [s.command for s in CURLS]  # the parser still finds the pages' commands
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    env = {"KERAS_SERVE_ADMIN_TOKEN": ADMIN_TOKEN, "H": f"Authorization: Bearer {ADMIN_TOKEN}", "TOKEN": API_TOKEN}
    wrong = []
    for shown in CURLS:
        if shown.page in TOKEN_PAGES:
            srv, headers = token_server, {"Authorization": f"Bearer {API_TOKEN}"}
        else:
            srv, headers = default_server, admin
        version = requests.get(srv.url + "/model", timeout=30).json()["sha256"]
        command = fill_placeholders(shown.command, srv.url, headers, version)
        want = expected_status(shown)
        statuses, answer = run_curl(command, workdir, env)
        if (example := shown_json(shown)) is not None and shape(example) != shape(json.loads(answer)):
            wrong.append(f"{shown.page}: `{shown.command}` shows {example}, a real answer is {answer}")
        for got in statuses:
            # a 429 needs the page's rate limit spent first (tests/test_access_http.py does that):
            # here it only has to answer, and not with a server error
            if got >= 500 or (got != want and want != 429):
                wrong.append(f"{shown.page}: `{shown.command}` answered {got}, the page shows {want}")
    assert not wrong, "\n".join(wrong)


# --- every python command parses its options ----------------------------------------------------

class Parsed(Exception):
    """Raised in place of running a command once its options parsed."""


def python_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, args) for each `python -m keras_serve.x ...` / `python app.py ...` shown."""
    found = []
    for shown in ALL_SHOWN:
        if shown.command.startswith("curl"):
            continue
        words = shlex.split(shown.command, comments=True)
        for stop in ("|", "&", "&&", ";", ">", "2>"):
            if stop in words:
                words = words[:words.index(stop)]
        while words and re.match(r"\w+=", words[0]):
            words = words[1:]
        program, *rest = words
        assert Path(program).name == "python", shown.command
        if any("[" in w or "..." in w or "<" in w for w in rest):
            continue  # a synopsis, not a command to type
        if rest[:1] == ["app.py"]:
            found.append((shown.page, "app.py", rest[1:]))
        elif rest[:1] == ["-m"] and rest[1].startswith("keras_serve."):
            found.append((shown.page, rest[1], rest[2:]))
    return found


PYTHON_COMMANDS = python_commands()


def test_the_pages_show_python_commands():
    modules = {module for _, module, _ in PYTHON_COMMANDS}
    assert {"app.py", "keras_serve.storage", "keras_serve.model", "keras_serve.client"} <= modules, modules
    assert len(PYTHON_COMMANDS) >= 20


@pytest.mark.parametrize("page,module,args", PYTHON_COMMANDS,
                         ids=[f"{page}:{module}:{' '.join(args)[:60]}" for page, module, args in PYTHON_COMMANDS])
def test_every_python_command_shown_parses_its_options(page, module, args, monkeypatch):
    if any(a.startswith("../shared") for a in args) and not (ROOT.parent / "shared").is_dir():
        pytest.skip("the real photos are absent: ../shared/data")  # CI has them
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.delitem(sys.modules, module + ".__main__", raising=False)  # runpy runs it afresh
    try:  # as `python -m module args` / `python app.py args` would, up to the parsed options
        if module == "app.py":
            runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except Parsed:
        return
    except SystemExit as exc:
        pytest.fail(f"{page}: `{module} {' '.join(args)}` is refused by its own parser (exit {exc.code})")
    pytest.fail(f"{module} ended without parsing its options")


# --- the reference's routes -----------------------------------------------------------------

def reference_routes() -> set[str]:
    text = (ROOT / "docs" / "reference.md").read_text()
    table = text.split("## Routes", 1)[1].split("\n## ", 1)[0]
    routes = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        for code in re.findall(r"`([^`]+)`", first_cell):
            routes.update(w for w in code.split() if w.startswith("/"))
        routes.update(w for w in re.findall(r"`?(/[^\s`)|,]+)", first_cell))
    return {normal(r) for r in routes}


def normal(route: str) -> str:
    return re.sub(r"<[^>]+>", "<>", route.rstrip(","))


def test_the_reference_names_every_route_and_only_real_ones(make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=ADMIN_TOKEN)
    live = {normal(rule.rule) for rule in app.url_map.iter_rules() if not rule.rule.startswith("/static/")}
    documented = reference_routes()
    families = {d.removesuffix("...") for d in documented if d.endswith("...")}
    exact = documented - {d for d in documented if d.endswith("...")}

    def covered(route: str) -> bool:
        return route in exact or any(route.startswith(f) for f in families)

    missing = sorted(r for r in live if not covered(r))
    assert not missing, f"routes missing from docs/reference.md: {missing}"
    unknown = sorted(exact - live)
    assert not unknown, f"docs/reference.md names routes the app does not have: {unknown}"
    assert all(any(r.startswith(f) for r in live) for f in families)
