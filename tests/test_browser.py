"""A real browser: Playwright drives Debian's Chromium through the plain upload form (JavaScript off).

Playwright cannot download its own browser here, so it launches /usr/bin/chromium
(`apt-get install -y chromium`; .ci/run does; tests/chromium.py). Without Chromium the test skips with that
command, except where REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""
import re

from chromium import require_chromium
from images import RED, image_bytes
from server_process import ServerProcess

require_chromium()


def test_upload_form_shows_label_confidence_and_image(browser, colour_model_path, tmp_path):
    photo = tmp_path / "red photo.jpg"
    photo.write_bytes(image_bytes(RED, (320, 240)))
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / "uploads")) as server:
        # The plain form, as without JavaScript (with it, static/upload.js takes the form over:
        # tests/test_upload_page.py). It must keep working: it is the page's fallback.
        context = browser.new_context(java_script_enabled=False)
        page = context.new_page()
        page.goto(server.url + "/")
        page.set_input_files("input[type=file][name=file]", str(photo))
        page.click("button[type=submit]")
        page.wait_for_selector("#label")
        assert page.url.rstrip("/").endswith("/file")
        assert page.inner_text("#label") == "DOG"
        assert re.match(r"Confidence: \d+\.\d%", page.inner_text("#confidence"))
        # The image really rendered: the browser fetched and decoded it.
        width = page.eval_on_selector("#upload", "img => img.complete ? img.naturalWidth : 0")
        assert width == 320
        page.click("#again")
        page.wait_for_selector("input[type=file]")

        # Errors come back as a page too.
        bad = tmp_path / "notes.jpg"
        bad.write_text("not really a jpeg")
        page.set_input_files("input[type=file][name=file]", str(bad))
        page.click("button[type=submit]")
        page.wait_for_selector("#message")
        assert "not an image" in page.inner_text("#message")
        context.close()
