"""The API reference page (/docs) in a real browser: Swagger UI renders /openapi.json under a strict
CSP, every operation is listed, and try-it sends a real image and shows the curl command, at 390 px.

Chromium as in tests/test_browser.py (`apt-get install chromium`); without it this skips,
except where REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""
import requests

from server_process import ServerProcess
from chromium import launch, require_chromium
from images import RED, image_bytes

require_chromium()

PHONE = {"width": 390, "height": 844}


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical findings (run through DevTools: the page's CSP stays on)."""
    from axe_playwright_python.sync_playwright import Axe

    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
            for v in Axe().run(page).response["violations"] if v["impact"] in ("serious", "critical")]


def test_the_reference_page_renders_every_operation_and_tries_one_at_390_px(colour_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "red.jpg"
    photo.write_bytes(image_bytes(RED))
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / "uploads")) as server, \
            sync_playwright() as p:
        doc = requests.get(server.url + "/openapi.json", timeout=10).json()
        operations = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
        browser = launch(p)
        try:
            page = browser.new_page(viewport=PHONE)
            problems, requested = [], []

            def on_console(message) -> None:
                # The browser asks for /favicon.ico by itself; the site has none (a 404, not the page's fault).
                if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
                    problems.append(f"{message.text} ({message.location.get('url')})")

            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: requested.append(request.url))
            answer = page.goto(server.url + "/docs")
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
            page.wait_for_selector(".opblock")
            rendered = set(page.eval_on_selector_all(".opblock", "nodes => nodes.map(n => n.id.split('-').pop())"))
            assert rendered == operations
            tags = page.eval_on_selector_all(".opblock-tag", "nodes => nodes.map(n => n.dataset.tag)")
            assert tags[0] == "classify"  # what a programmer comes for, first
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling

            classify = "#operations-classify-classify"
            page.click(f"{classify} .opblock-summary")
            page.click(f"{classify} .try-out__btn")
            page.set_input_files(f"{classify} input[type=file]", str(photo))
            page.click(f"{classify} .execute")
            page.wait_for_selector(f"{classify} .live-responses-table")
            assert '"label": "DOG"' in page.inner_text(f"{classify} .live-responses-table")
            curl = page.inner_text(f"{classify} .curl-command")
            assert f"'{server.url}/file/'" in curl and "-F 'file=@red.jpg" in curl
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

            assert all(url.startswith(server.url) or url.startswith("data:") for url in requested), requested
            assert problems == []  # a CSP violation is reported on the console
            page.click("section.models h4")  # the schemas, folded at first
            page.wait_for_function("document.querySelector('section.models').innerText.includes('ErrorBody')")
            assert serious_violations(page) == []
        finally:
            browser.close()
