"""Debian's Chromium for the browser tests, which Playwright drives but can never download.

A test module calls `require_chromium()` at import: without /usr/bin/chromium it skips with
the command that installs it, except where REQUIRE_BROWSER=1 (CI), where the launch then fails.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_COMMAND = "apt-get install -y chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists() and os.environ.get("REQUIRE_BROWSER") != "1":
        pytest.skip(f"Chromium not found at {CHROMIUM}: run `{INSTALL_COMMAND}` as root "
                    "(or point CHROMIUM_PATH at a Chromium)", allow_module_level=True)


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
