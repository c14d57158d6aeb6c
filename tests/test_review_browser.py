"""The review page in a real browser: log in, filter, correct with the keyboard, see the counts change.

Debian's Chromium through Playwright, as tests/test_browser.py; without Chromium this skips
(`apt-get install chromium`), except where REQUIRE_BROWSER=1 (CI), where it fails.
With KERAS_SERVE_SCREENSHOT=docs/img/review.png it also saves the screenshot docs/review.md shows.
"""
import os
import re
import requests

from server_process import ServerProcess
from chromium import launch, require_chromium

require_chromium()

TOKEN = "browser-review-token-0123456789"
# Reds (DOG) and blues (CAT) with a few unsure ones between; a photo-like gradient each.
COLOURS = [(230, 40, 30), (40, 60, 220), (150, 60, 120), (210, 90, 40), (60, 110, 200), (130, 70, 140),
           (220, 160, 60), (50, 150, 210), (170, 80, 90), (90, 80, 180), (200, 60, 70), (70, 90, 160)]


def counts(page) -> dict[str, int]:
    return {el.get_attribute("data-count"): int(el.inner_text()) for el in page.query_selector_all("[data-count]")}


def wait_until(page, selector: str, predicate: str, timeout_s: float = 10.0) -> None:
    """Poll `predicate` over the elements matching `selector`. (wait_for_function would evaluate
    a string in the page, which the review page's CSP forbids: no unsafe-eval.)"""
    for _ in range(int(timeout_s * 10)):
        if page.eval_on_selector_all(selector, predicate):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"{predicate} did not hold for {selector} within {timeout_s} s")


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now (as test_upload_page)."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


# Each filter's text and every field of its label share a line: the boxes overlap vertically.
FILTERS_APART = """labels => labels.flatMap(label => {
    const range = document.createRange();
    range.selectNodeContents(label.firstChild);
    const text = range.getBoundingClientRect();
    return Array.from(label.querySelectorAll("select, input")).map(field => field.getBoundingClientRect())
        .filter(field => !(field.top < text.bottom && field.bottom > text.top))
        .map(() => label.firstChild.textContent.trim());
})"""


def overflow(page) -> int:
    return page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


def gradient_png(colour, size=(320, 240)) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    for y in range(size[1]):  # a soft vertical shade, so the thumbnails look like something
        shade = tuple(max(0, min(255, int(c * (0.75 + 0.5 * y / size[1])))) for c in colour)
        draw.line([(0, y), (size[0], y)], fill=shade)
    draw.ellipse([size[0] * 0.3, size[1] * 0.25, size[0] * 0.7, size[1] * 0.8], fill=tuple(min(255, c + 30) for c in colour))
    import io

    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_review_page_filter_correct_with_the_keyboard_counts_change(colour_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / "uploads"),
                       env={"KERAS_SERVE_ADMIN_TOKEN": TOKEN}) as server:
        answers = []
        for colour in COLOURS:
            r = requests.post(server.url + "/file/", files={"file": ("photo.png", gradient_png(colour))}, timeout=60)
            assert r.status_code == 200
            answers.append(r.json())
        cats = [a for a in answers if a["label"] == "CAT"]

        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            # script errors and CSP violations; failed loads by URL (the browser asks for /favicon.ico)
            page.on("console", lambda m: errors.append(m.text)
                    if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            # a visitor says "No, it is CAT" under a result: a plain form post, no login
            photo = tmp_path / "visitor.png"
            photo.write_bytes(gradient_png((235, 50, 40)))
            # (the result page's form; with JavaScript the upload page answers in tiles instead)
            visitor = browser.new_context(java_script_enabled=False).new_page()
            visitor.goto(server.url + "/")
            visitor.set_input_files("input[type=file][name=file]", str(photo))
            visitor.click("button[type=submit]")
            visitor.wait_for_selector("#feedback")
            visitor.click("#feedback button[value=CAT]")
            visitor.wait_for_selector("#thanks")
            visitor.context.close()

            page.goto(server.url + "/review")
            assert page.url.endswith("/review/login")
            # The login is a styled card (not a bare form on the page's background), phone-wide too.
            card = page.locator(".login-card")
            assert card.evaluate("c => getComputedStyle(c).backgroundColor") != page.evaluate(
                "() => getComputedStyle(document.body).backgroundColor")
            assert page.locator("#token").evaluate("i => i.getBoundingClientRect().height") >= 44
            page.set_viewport_size({"width": 390, "height": 844})
            assert overflow(page) == 0 and serious_violations(page) == []
            page.set_viewport_size({"width": 1280, "height": 900})
            page.fill("#name", "ana")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#grid .card")
            assert counts(page)["total"] == len(COLOURS) + 1 and counts(page)["feedback_disagrees"] == 1
            # every thumbnail really rendered (made by the server, WebP, at most 256 px)
            wait_until(page, "#grid img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
            assert page.eval_on_selector("#grid img", "i => i.naturalWidth") == 256

            # The filter bar wraps between filters, never between a label and its field.
            for width in (1280, 390):
                page.set_viewport_size({"width": width, "height": 900})
                assert page.eval_on_selector_all(".filters label", FILTERS_APART) == [], width
                assert overflow(page) == 0, width
            page.set_viewport_size({"width": 1280, "height": 900})

            # filter: predicted CAT only
            page.select_option("#filter-label", "CAT")
            page.click("#apply")
            page.wait_for_url(re.compile(r"label=CAT"))
            ids = page.eval_on_selector_all("#grid .card", "cards => cards.map(c => c.dataset.id)")
            assert sorted(ids) == sorted(a["id"] for a in cats)

            # keyboard: y confirms the first, d says the second is a DOG, n says the third is neither
            page.keyboard.press("y")
            page.wait_for_selector(f'.card[data-id="{ids[0]}"].state-confirmed')
            assert page.eval_on_selector(".card.selected", "c => c.dataset.id") == ids[1]
            page.keyboard.press("d")
            page.wait_for_selector(f'.card[data-id="{ids[1]}"].state-corrected')
            page.keyboard.press("n")
            page.wait_for_selector(f'.card[data-id="{ids[2]}"].state-corrected')
            wait_until(page, "[data-count=to_review]", "els => els[0].textContent == '%d'" % (len(COLOURS) + 1 - 3))
            assert counts(page) | {} == {"total": len(COLOURS) + 1, "to_review": len(COLOURS) + 1 - 3, "confirmed": 1,
                                         "corrected": 2, "feedback_disagrees": 1}

            # the server agrees, and the history names the reviewer
            cookies = {c["name"]: c["value"] for c in page.context.cookies()}
            session = requests.Session()
            session.cookies.update(cookies)
            history = session.get(f"{server.url}/api/uploads/{ids[1]}/reviews", timeout=10).json()["reviews"]
            assert [(h["label"], h["reviewer"]) for h in history] == [("DOG", "ana")]
            # a cookie alone cannot change anything: the CSRF token is needed
            assert session.post(f"{server.url}/api/uploads/{ids[3]}/review", json={"label": "DOG"},
                                timeout=10).status_code == 400

            # the filter "not reviewed" now leaves those three out
            page.goto(server.url + "/review?reviewed=no")
            left = page.eval_on_selector_all("#grid .card", "cards => cards.map(c => c.dataset.id)")
            assert not set(ids[:3]) & set(left) and len(left) == len(COLOURS) + 1 - 3

            shot = os.environ.get("KERAS_SERVE_SCREENSHOT")  # before the bulk confirm below: a page mid-review
            if shot:
                page.goto(server.url + "/review")
                wait_until(page, "#grid img", "imgs => imgs.every(i => i.complete)")
                page.keyboard.press("ArrowRight")
                page.screenshot(path=shot, full_page=True)

            # the bulk confirm asks first, and confirms only the cards nobody has decided yet
            page.goto(server.url + "/review?label=CAT")
            page.wait_for_selector("#grid .card")
            decision = f'.card[data-id="{ids[2]}"] [data-decision]'
            assert page.inner_text(decision) == "neither" and page.is_visible(decision)  # the person's label shows
            page.click("#confirm-page")
            page.wait_for_selector("#confirm-dialog[open]")
            assert page.inner_text("[data-confirm-count]") == str(len(cats) - 3)
            page.click("#confirm-cancel")  # cancelled: nothing sent, nothing changed
            assert page.query_selector("#confirm-dialog[open]") is None
            assert page.eval_on_selector_all(".card.state-not_reviewed", "cards => cards.length") == len(cats) - 3
            page.click("#confirm-page")
            page.wait_for_selector("#confirm-dialog[open]")
            assert serious_violations(page) == []  # the open dialog, and reviewed cards behind it
            page.click("#confirm-go")
            wait_until(page, ".card.state-not_reviewed", "cards => cards.length == 0")
            assert page.inner_text(decision) == "neither"
            assert page.inner_text(f'.card[data-id="{ids[1]}"] [data-decision]') == "DOG"
            for upload_id, label in ((ids[1], "DOG"), (ids[2], "neither")):
                history = session.get(f"{server.url}/api/uploads/{upload_id}/reviews", timeout=10).json()["reviews"]
                assert [h["label"] for h in history] == [label]  # the corrections survived
            wait_until(page, "[data-count=confirmed]", "els => els[0].textContent == '%d'" % (len(cats) - 2))
            assert not errors, errors  # no CSP violation, no script error

            browser.close()
