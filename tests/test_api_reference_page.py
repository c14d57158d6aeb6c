"""The API reference page (/docs) in a real browser: it renders /openapi.json under a strict CSP.

Chromium as in tests/test_browser.py (`apt-get install chromium`); without it this skips,
except where REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""
import requests

from server_process import ServerProcess
from chromium import launch, require_chromium

require_chromium()


def test_the_reference_page_lists_every_operation_without_breaking_the_csp(colour_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path)) as server, \
            sync_playwright() as p:
        doc = requests.get(server.url + "/openapi.json", timeout=10).json()
        operations = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
        browser = launch(p)
        try:
            page = browser.new_page()
            problems = []

            def on_console(message) -> None:
                # The browser asks for /favicon.ico by itself; the site has none (a 404, not the page's fault).
                if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
                    problems.append(f"{message.text} ({message.location.get('url')})")

            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(str(error)))
            answer = page.goto(server.url + "/docs")
            assert "script-src 'self'" in answer.headers["content-security-policy"]
            assert "unsafe-inline" not in answer.headers["content-security-policy"]
            page.wait_for_selector("section.operation")
            rendered = set(page.eval_on_selector_all("section.operation", "nodes => nodes.map(n => n.id.slice(3))"))
            assert rendered == operations
            assert page.inner_text("#op-web_classify_slash_post h3") == "POST /file/"
            assert "Classification" in page.inner_text("#op-web_classify_slash_post")
            assert page.is_visible("#schema-ErrorBody")
            assert problems == []  # a CSP violation is reported on the console
        finally:
            browser.close()
