"""The upload page in real Chromium, with its script: many photos, every way they arrive.

Choose several, drop, paste, the camera control, HEIC without a preview, a rejected file
beside good ones, the per-go limit, phone and desktop widths, and axe-core's accessibility
checks on every page. The colour model answers what the test expects: red is DOG, blue CAT.
(The plain form with JavaScript off: tests/test_browser.py.)
"""
from __future__ import annotations

import base64
import re

import pytest

from chromium import require_chromium
from images import BLUE, RED, image_bytes
from server_process import ServerProcess

require_chromium()

MAX_FILES = 4
FINISHED = ".tile[data-state=done], .tile[data-state=unsure], .tile[data-state=failed]"


UNSURE_BELOW = 0.75  # grey scores 0.5 (unsure), red and blue over 0.999 (sure)
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def conv_colour_model_path(tmp_path_factory):
    """The colour model with a convolution in front (identity 1x1 kernels): the same answers,
    and a layer for Grad-CAM to look at."""
    import keras
    import numpy as np

    from conftest import build_colour_model

    colour = build_colour_model()
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(3, 1, name="conv")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(x), name="conv_colour")
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.zeros(3, np.float32)])
    dense.set_weights(colour.layers[-1].get_weights())
    path = tmp_path_factory.mktemp("models") / "conv_colour.h5"
    model.save(path)
    return path


def start_server(model_path, tmp_path_factory, env: dict[str, str] | None = None) -> ServerProcess:
    uploads = tmp_path_factory.mktemp("uploads")
    server = ServerProcess("--model", str(model_path), "--upload-dir", str(uploads), "--max-upload-mb", "1",
                           "--max-files", str(MAX_FILES), "--unsure-below", str(UNSURE_BELOW), env=env)
    server.uploads = uploads
    return server


@pytest.fixture(scope="module")
def page_server(conv_colour_model_path, tmp_path_factory):
    with start_server(conv_colour_model_path, tmp_path_factory) as server:
        yield server


@pytest.fixture()
def open_page(browser, page_server):
    """A fresh context on the upload page; console errors other than failed requests fail the test."""
    contexts, errors = [], []

    def open_(**context_args):
        context = browser.new_context(**context_args)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_server.url + "/")
        page.locator("#dropzone").wait_for()
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], f"the page's script threw: {errors}"


def photo(name: str, colour=RED, size=(96, 72), fmt="JPEG", mime="image/jpeg") -> dict:
    return {"name": name, "mimeType": mime, "buffer": image_bytes(colour, size, fmt)}


def wait_finished(page, count: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator(FINISHED)).to_have_count(count, timeout=30_000)


def tile(page, filename: str):
    return page.locator(".tile", has=page.locator(".filename", has_text=re.compile(f"^{re.escape(filename)}$")))


def in_page_files(files: list[dict]) -> list[dict]:
    """Files as the page's own script can rebuild them (base64), for drop and paste events."""
    return [{"name": f["name"], "type": f["mimeType"], "data": base64.b64encode(f["buffer"]).decode()}
            for f in files]


MAKE_DATA_TRANSFER = """
(files) => {
  const transfer = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], f.name, { type: f.type }));
  }
  return transfer;
}
"""


def test_several_chosen_photos_each_get_label_confidence_bars_and_stored_link(open_page, page_server):
    page = open_page()
    page.set_input_files("#file", [photo("red.jpg", RED), photo("blue.png", BLUE, fmt="PNG", mime="image/png"),
                                   photo("red2.jpg", RED)])
    wait_finished(page, 3)
    red, blue = tile(page, "red.jpg"), tile(page, "blue.png")
    assert red.locator(".label").inner_text() == "DOG"
    assert blue.locator(".label").inner_text() == "CAT"
    assert re.fullmatch(r"\d{1,3}\.\d %", red.locator(".confidence").inner_text())
    # A bar per label, the winner's the widest.
    assert red.locator(".bar").count() == 2
    assert red.locator(".bar.winner .bar-label").inner_text() == "DOG"
    widths = red.locator(".bar-fill").evaluate_all("bars => bars.map(b => b.getBoundingClientRect().width)")
    assert widths[0] > 10 * max(widths[1], 0.1)
    # The preview is the chosen file itself, shown before any answer came back.
    assert red.locator("img.preview").evaluate("img => img.src.startsWith('blob:') && img.naturalWidth") == 96
    # The stored upload is the very bytes sent.
    href = red.locator("a.stored").get_attribute("href")
    assert re.fullmatch(r"/uploads/[A-Za-z0-9_-]+", href)
    stored = page.request.get(page_server.url + href)
    assert stored.ok and stored.body() == image_bytes(RED, (96, 72), "JPEG")
    assert page.locator("#progress").inner_text() == "3 done"
    # Screen readers hear each answer through the live region.
    announcer = page.locator("#announcer[aria-live=polite]")
    assert re.search(r"red\.jpg: DOG, \d+\.\d %", announcer.inner_text())
    assert "All 3 photos done." in announcer.inner_text()
    # The keyboard starts at the drop zone.
    page.locator("body").focus()
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "dropzone"


def test_dropped_photos_are_classified(open_page):
    page = open_page()
    files = in_page_files([photo("dropped red.jpg", RED), photo("dropped blue.jpg", BLUE)])
    transfer = page.evaluate_handle(MAKE_DATA_TRANSFER, files)
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
    assert "dragging" in page.locator("body").get_attribute("class")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    wait_finished(page, 2)
    assert tile(page, "dropped red.jpg").locator(".label").inner_text() == "DOG"
    assert tile(page, "dropped blue.jpg").locator(".label").inner_text() == "CAT"
    assert "dragging" not in (page.locator("body").get_attribute("class") or "")


def test_pasted_image_is_classified(open_page):
    page = open_page()
    # What the clipboard holds after "copy image": a file with a generic name.
    files = in_page_files([photo("image.png", BLUE, fmt="PNG", mime="image/png")])
    page.evaluate(f"""(files) => {{
        const transfer = ({MAKE_DATA_TRANSFER})(files);
        document.dispatchEvent(new ClipboardEvent("paste", {{ clipboardData: transfer, bubbles: true }}));
    }}""", files)
    wait_finished(page, 1)
    assert tile(page, "image.png").locator(".label").inner_text() == "CAT"


def test_camera_control_and_chooser(open_page):
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    chooser = page.locator("#file")
    assert chooser.get_attribute("accept") == "image/*"
    assert chooser.evaluate("input => input.multiple") is True
    assert chooser.get_attribute("capture") is None  # the library stays reachable
    camera = page.locator("#camera")
    assert camera.get_attribute("accept") == "image/*"
    assert camera.get_attribute("capture") == "environment"
    # "Take a photo" opens the camera input; the drop zone, a real button, opens the chooser, from
    # the keyboard too. Which input each one opens is recorded by a spy on input.click(): a real
    # file chooser event only comes while none is pending in the browser, which made it flaky.
    page.evaluate("""() => {
        window.clickedInputs = [];
        const click = HTMLInputElement.prototype.click;
        HTMLInputElement.prototype.click = function () { window.clickedInputs.push(this.id); return click.call(this); };
    }""")
    assert page.locator("#camera-button").is_visible()
    with page.expect_file_chooser() as opened:  # the real thing, once: Chromium offers a chooser
        page.click("#camera-button")
    assert opened.value.element.get_attribute("id") == "camera"
    page.locator("#dropzone").focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Space")
    assert page.evaluate("() => window.clickedInputs") == ["camera", "file", "file"]


def test_a_rejected_file_shows_its_error_beside_the_good_ones(open_page):
    page = open_page()
    page.set_input_files("#file", [photo("good.jpg", RED),
                                   {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not really a jpeg"},
                                   photo("good2.jpg", BLUE)])
    wait_finished(page, 3)
    bad = tile(page, "notes.jpg")
    assert bad.get_attribute("data-state") == "failed"
    assert "not an image" in bad.locator(".error-message").inner_text()
    assert "JPEG" in bad.locator(".error-hint").inner_text()  # the server's hint: what to send instead
    assert tile(page, "good.jpg").locator(".label").inner_text() == "DOG"
    assert tile(page, "good2.jpg").locator(".label").inner_text() == "CAT"


def test_a_lost_connection_offers_try_again_and_clear_empties_the_list(open_page):
    page = open_page()
    page.route("**/file/", lambda route: route.abort("internetdisconnected"))
    page.set_input_files("#file", [photo("offline.jpg", RED)])
    wait_finished(page, 1)
    offline = tile(page, "offline.jpg")
    assert "Could not reach the server" in offline.locator(".error-message").inner_text()
    page.unroute("**/file/")
    offline.locator(".retry").click()  # the same file, sent again
    from playwright.sync_api import expect

    expect(offline).to_have_attribute("data-state", "done", timeout=30_000)
    assert offline.locator(".label").inner_text() == "DOG"
    page.click("#clear")
    assert page.locator(".tile").count() == 0 and page.locator("#results-section").is_hidden()
    assert page.evaluate("() => document.activeElement.id") == "dropzone"


def test_heic_is_classified_and_previewed_with_the_servers_thumbnail(open_page):
    import pillow_heif
    from playwright.sync_api import expect

    pillow_heif.register_heif_opener()
    page = open_page()
    page.set_input_files("#file", [photo("IMG_0001.HEIC", RED, fmt="HEIF", mime="image/heic")])
    wait_finished(page, 1)
    heic = tile(page, "IMG_0001.HEIC")
    assert heic.locator(".label").inner_text() == "DOG"
    # Chromium cannot draw HEIC: the preview is the server's WebP thumbnail of the stored image.
    preview = heic.locator("img.preview")
    expect(preview).to_be_visible(timeout=30_000)
    assert re.search(r"/uploads/[A-Za-z0-9_-]+/thumbnail\.webp$", preview.get_attribute("src"))
    assert preview.evaluate("img => img.naturalWidth") == 96
    assert heic.locator(".no-preview").is_hidden()


def test_more_photos_than_one_go_takes_get_a_message(open_page):
    page = open_page()
    page.set_input_files("#file", [photo(f"p{i}.jpg", RED) for i in range(MAX_FILES + 2)])
    wait_finished(page, MAX_FILES)
    notice = page.locator("#notice")
    assert notice.is_visible()
    assert f"Up to {MAX_FILES} photos at a time" in notice.inner_text()
    assert "2 were left out" in notice.inner_text()
    assert page.locator(".tile").count() == MAX_FILES
    assert tile(page, "p0.jpg").count() == 1 and tile(page, f"p{MAX_FILES}.jpg").count() == 0


def test_a_file_over_the_size_limit_is_refused_before_sending(open_page):
    page = open_page()
    big = {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8" + bytes(1024 * 1024 + 10)}
    page.set_input_files("#file", [big, photo("small.jpg", BLUE)])
    wait_finished(page, 2)
    assert "the limit is 1.0 MB" in tile(page, "huge.jpg").locator(".error-message").inner_text()
    assert tile(page, "small.jpg").locator(".label").inner_text() == "CAT"


def test_an_unclear_photo_says_not_sure_with_both_scores(open_page):
    page = open_page()
    page.set_input_files("#file", [photo("grey.jpg", GREY), photo("red.jpg", RED)])
    wait_finished(page, 2)
    grey, red = tile(page, "grey.jpg"), tile(page, "red.jpg")
    assert grey.get_attribute("data-state") == "unsure"
    assert grey.locator(".not-sure").is_visible()
    advice = grey.locator(".unsure").inner_text()
    assert "not sure" in advice
    assert re.search(r"DOG \d+\.\d %", advice) and re.search(r"CAT \d+\.\d %", advice)  # both scores
    assert "say which it is below" in advice
    assert grey.locator(".feedback-choice").all_inner_texts() == ["Yes", "DOG", "Neither"]
    assert grey.locator(".feedback-choice").evaluate_all("bs => bs.map(b => b.getAttribute('aria-label'))") == [
        "Yes, it is CAT", "No, it is DOG", "No, neither"]
    assert red.get_attribute("data-state") == "done" and red.locator(".not-sure").is_hidden()
    assert red.locator(".unsure").is_hidden()


def test_heatmap_toggle_lays_grad_cam_over_the_photo(open_page, page_server):
    page = open_page()
    page.set_input_files("#file", [photo("red.jpg", RED, size=(120, 90))])
    wait_finished(page, 1)
    red = tile(page, "red.jpg")
    button, overlay = red.locator(".heatmap-toggle"), red.locator("img.heatmap")
    assert button.get_attribute("aria-pressed") == "false" and overlay.is_hidden()
    button.click()
    from playwright.sync_api import expect

    expect(button).to_have_attribute("aria-pressed", "true")
    expect(overlay).to_be_visible()
    expect(overlay).to_have_js_property("complete", True)
    assert overlay.evaluate("img => img.naturalWidth") > 0
    assert "where the model looked" in overlay.get_attribute("alt")
    # Over the photo, exactly: the same box.
    boxes = [red.locator(sel).bounding_box() for sel in ("img.preview", "img.heatmap")]
    assert boxes[0] == boxes[1]
    # Its key (a colour scale from "less" to "more") and an opacity control, from the keyboard.
    controls = red.locator(".heatmap-controls")
    expect(controls).to_be_visible()
    assert re.fullmatch(r"less\s*more", red.locator(".heat-legend").inner_text().strip())
    assert red.get_by_role("img", name=re.compile("Colour scale")).is_visible()
    opacity = red.get_by_role("slider", name="Opacity")
    assert overlay.evaluate("img => getComputedStyle(img).opacity") == "1"
    opacity.focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert opacity.input_value() == "80"
    assert overlay.evaluate("img => getComputedStyle(img).opacity") == "0.8"
    button.click()
    expect(button).to_have_attribute("aria-pressed", "false")
    expect(overlay).to_be_hidden()
    expect(controls).to_be_hidden()
    # From the keyboard too: Space on the focused button.
    button.focus()
    page.keyboard.press("Space")
    expect(button).to_have_attribute("aria-pressed", "true")


def test_heatmap_of_a_model_without_convolution_says_why(browser, colour_model_path, tmp_path_factory):
    with start_server(colour_model_path, tmp_path_factory) as server:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + "/")
        page.set_input_files("#file", [photo("red.jpg", RED)])
        wait_finished(page, 1)
        red = tile(page, "red.jpg")
        red.locator(".heatmap-toggle").click()
        from playwright.sync_api import expect

        expect(red.locator(".heatmap-error")).to_be_visible()
        assert "convolution" in red.locator(".heatmap-error").inner_text()
        assert red.locator(".heatmap-toggle").get_attribute("aria-pressed") == "false"
        assert red.locator("img.heatmap").is_hidden()
        context.close()


def test_without_javascript_results_say_not_sure_switch_the_heatmap_and_take_several_photos(browser, page_server):
    from playwright.sync_api import expect

    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(page_server.url + "/")
    page.set_input_files("#file", photo("grey.jpg", GREY, size=(120, 90)))
    page.click("button[type=submit]")
    page.wait_for_selector("#label")
    assert "not sure" in page.inner_text("#unsure")
    heatmap = page.locator("#heatmap")
    expect(heatmap).to_be_hidden()
    page.check("#show-heatmap")  # a checkbox and CSS: no script needed
    expect(heatmap).to_be_visible()
    expect(heatmap).to_have_js_property("complete", True, timeout=30_000)  # made on demand: it may take a moment
    assert heatmap.evaluate("img => img.naturalWidth") > 0
    assert page.locator("#heatmap").bounding_box() == page.locator("#upload").bounding_box()
    page.uncheck("#show-heatmap")
    expect(heatmap).to_be_hidden()

    # Several photos without JavaScript: the server's page of results, a bad file among them.
    page.goto(page_server.url + "/")
    assert "Up to 4 photos, 1 MB in all." in page.inner_text("#plain-limits")
    page.set_input_files("#file", [photo("red.jpg", RED), photo("blue.jpg", BLUE),
                                   {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"nope"}])
    page.click("button[type=submit]")
    page.wait_for_selector("#results-title")
    assert page.locator("#results .label").all_inner_texts() == ["DOG", "CAT"]
    assert "not an image" in page.inner_text("#results .error-message")
    context.close()


@pytest.mark.parametrize("viewport", [{"width": 320, "height": 640}, {"width": 390, "height": 844},
                                      {"width": 1280, "height": 800}], ids=["small-phone", "phone", "desktop"])
def test_no_horizontal_overflow_with_results(open_page, viewport):
    page = open_page(viewport=viewport)
    long_name = "a very long file name from a phone camera roll without any spaces_" * 3 + ".jpg"
    page.set_input_files("#file", [photo(long_name, RED), photo("blue.jpg", BLUE),
                                   {"name": "bad.gif", "mimeType": "image/gif", "buffer": b"GIF89a broken"}])
    wait_finished(page, 3)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow == 0
    # Touch targets: every button at least 44 px tall.
    heights = page.locator("button:visible").evaluate_all("bs => bs.map(b => b.getBoundingClientRect().height)")
    assert heights and min(heights) >= 44


# --- tile geometry, the photo large, the example pictures ------------------------------------

def boxes(locator) -> list[dict]:
    return locator.evaluate_all("els => els.map(e => { const r = e.getBoundingClientRect(); "
                                "return {top: r.top, bottom: r.bottom, height: r.height}; })")


@pytest.mark.parametrize("viewport", [{"width": 390, "height": 844}, {"width": 1280, "height": 1024}],
                         ids=["phone", "desktop"])
def test_result_tiles_are_short_and_feedback_is_one_row_of_small_buttons(open_page, viewport):
    phone = viewport["width"] < 500
    page = open_page(viewport=viewport, is_mobile=phone, has_touch=phone)
    page.set_input_files("#file", [photo(f"p{i}.jpg", RED if i % 2 else BLUE) for i in range(MAX_FILES)])
    wait_finished(page, MAX_FILES)
    for element in page.locator(".tile").all():
        tile_height = boxes(element)[0]["height"]
        feedback = boxes(element.locator(".tile-feedback"))[0]
        buttons = boxes(element.locator("button.feedback-choice"))
        assert len(buttons) == 3 and len({round(b["top"]) for b in buttons}) == 1  # one row
        assert feedback["height"] <= 0.2 * tile_height
        if phone:
            # The photo beside the answer, the question on the buttons' row: a phone shows a
            # tile in well under half of its screen (it took 600 px of 844 before).
            assert tile_height <= 300
            legend = boxes(element.locator(".tile-feedback legend"))[0]
            assert legend["top"] < buttons[0]["bottom"] and legend["bottom"] > buttons[0]["top"]
        else:
            assert tile_height <= 0.6 * viewport["height"]


def test_a_tile_opens_its_photo_large_and_escape_closes_it(open_page):
    from playwright.sync_api import expect

    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.set_input_files("#file", [photo("red.jpg", RED, size=(320, 240))])
    wait_finished(page, 1)
    opener = tile(page, "red.jpg").get_by_role("button", name="Show red.jpg large")
    dialog = page.locator("#lightbox")
    opener.click()
    expect(dialog).to_have_attribute("open", "")
    large = page.locator("#lightbox-image")
    assert large.get_attribute("src") == tile(page, "red.jpg").locator("img.preview").get_attribute("src")
    assert large.get_attribute("alt") == "Your photo red.jpg"
    # Large: as wide as the phone allows, far wider than the tile's square.
    assert large.bounding_box()["width"] > 2.5 * opener.bounding_box()["width"]
    assert page.locator("#lightbox-title").inner_text() == "red.jpg"
    assert serious_violations(page) == []
    page.keyboard.press("Escape")
    expect(dialog).not_to_have_attribute("open", "")
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "Show red.jpg large"
    # From the keyboard: Enter on the photo opens it, the Close button closes it.
    page.keyboard.press("Enter")
    expect(dialog).to_have_attribute("open", "")
    page.get_by_role("button", name="Close").click()
    expect(dialog).not_to_have_attribute("open", "")


def test_an_example_picture_is_classified_as_if_chosen(open_page, page_server):
    from keras_serve.settings import PROJECT_ROOT

    page = open_page()
    examples = page.locator("button.example")
    assert examples.count() == 3
    page.get_by_role("button", name="Example: a drawing of a dog").click()
    wait_finished(page, 1)
    example = tile(page, "example dog.jpg")
    assert example.locator(".label").inner_text() in ("CAT", "DOG")
    href = example.locator("a.stored").get_attribute("href")
    stored = page.request.get(page_server.url + href)
    assert stored.ok and stored.body() == (PROJECT_ROOT / "static" / "examples" / "dog.jpg").read_bytes()


def page_html(app, **headers) -> str:
    response = app.test_client().get("/", headers=headers)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_the_page_names_its_labels_links_the_docs_and_shows_the_hosts_curl(make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path))
    html = page_html(app, Host="photos.example.org")
    assert "<title>CAT or DOG? · keras-serve</title>" in html
    assert '<a href="/docs">API reference</a>' in html
    assert "curl -F file=@photo.jpg http://photos.example.org/file/" in html
    assert "this-host" not in html
    assert html.count('class="example"') == 3  # a cat/dog model gets the example pictures


@pytest.mark.parametrize("host", ['evil.example"><script>alert(1)</script>', "a'onmouseover='x", "a\tb"])
def test_a_hostile_host_header_never_reaches_the_curl_hint(make_app, colour_model_path, host):
    app = make_app(MODEL_PATH=str(colour_model_path))
    html = page_html(app, Host=host)
    hint = html[html.index('id="curl-hint"'):html.index("</p>", html.index('id="curl-hint"'))]
    assert "<script>alert(1)" not in html and "onmouseover" not in html and "evil.example" not in html
    assert "curl -F file=@photo.jpg http://YOUR-SERVER/file/" in hint  # a host no host could be


def test_the_curl_hint_escapes_what_it_shows(make_app, colour_model_path):
    # Belt and braces under Werkzeug's check: the value is autoescaped, not marked safe.
    from flask import render_template_string

    app = make_app(MODEL_PATH=str(colour_model_path))
    with app.test_request_context("/"):
        html = render_template_string('{% include "index.html" %}', model={"labels": ["CAT", "DOG"]},
                                      neither="neither", max_files=4, max_upload_bytes=1,
                                      public_url='http://x"><script>', examples=[])
    assert "http://x&#34;&gt;&lt;script&gt;/file/" in html and '"><script>' not in html


def test_other_labels_get_no_cat_and_dog_examples(make_app, colour_model_path):
    html = page_html(make_app(MODEL_PATH=str(colour_model_path), LABELS="apple,pear"))
    assert 'class="example"' not in html
    assert "<title>apple or pear? · keras-serve</title>" in html


def test_the_thumbnail_of_a_heic_upload_is_a_small_webp(make_app, colour_model_path):
    import io

    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    client = make_app(MODEL_PATH=str(colour_model_path)).test_client()
    answer = client.post("/file/", data={"file": (io.BytesIO(image_bytes(RED, (600, 400), "HEIF")), "a.heic")},
                         headers={"Accept": "application/json"})
    assert answer.status_code == 200
    thumbnail = client.get(f"/uploads/{answer.get_json()['id']}/thumbnail.webp")
    assert thumbnail.status_code == 200 and thumbnail.mimetype == "image/webp"
    assert Image.open(io.BytesIO(thumbnail.data)).size == (256, 171)
    missing = client.get("/uploads/not-an-upload/thumbnail.webp")
    assert missing.status_code == 404 and missing.get_json()["error"]["status"] == 404


# --- "Was this right?" on the tiles ---------------------------------------------------------

COUNT_FEEDBACK_POSTS = """() => {
    window.feedbackPosts = 0;
    const send = window.fetch;
    window.fetch = function (url) {
        if (String(url).endsWith("/feedback")) { window.feedbackPosts += 1; }
        return send.apply(this, arguments);
    };
}"""


def feedback_rows(uploads) -> list[tuple]:
    """The feedback table of the server's SQLite store, as an operator would read it."""
    import sqlite3

    with sqlite3.connect(uploads / "uploads.db") as db:
        return db.execute("SELECT upload_id, label, agrees FROM feedback ORDER BY id").fetchall()


def test_the_page_hands_every_label_to_its_script_as_json(make_app, colour_model_path):
    import json
    from html.parser import HTMLParser

    labels = ['cat "tabby" & co', "<b>dog</b>'s"]  # labels are the operator's text: quotes, markup
    app = make_app(MODEL_PATH=str(colour_model_path), LABELS=",".join(labels))
    found = []

    class ResultsList(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if ("id", "results") in attrs:
                found.append(dict(attrs))

    ResultsList().feed(app.test_client().get("/").get_data(as_text=True))
    assert json.loads(found[0]["data-labels"]) == labels and found[0]["data-neither"] == "neither"


@pytest.fixture(scope="module")
def one_feedback_server(colour_model_path, tmp_path_factory):
    """A server that takes one "Was this right?" answer an hour from an address: the next is a 429."""
    with start_server(colour_model_path, tmp_path_factory, env={"KERAS_SERVE_FEEDBACK_PER_HOUR": "1"}) as server:
        yield server


def test_a_tile_takes_one_answer_is_stored_and_the_limit_shows_its_hint(browser, one_feedback_server):
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(one_feedback_server.url + "/")
    page.evaluate(COUNT_FEEDBACK_POSTS)
    page.set_input_files("#file", [photo("red.jpg", RED), photo("blue.jpg", BLUE)])
    wait_finished(page, 2)
    red, blue = tile(page, "red.jpg"), tile(page, "blue.jpg")
    red_id = red.locator("a.stored").get_attribute("href").rsplit("/", 1)[1]
    # A labelled group per tile, one button per answer: yes, every other label, neither.
    assert page.get_by_role("group", name=re.compile(r"^Was this right\? \(red\.jpg\)$")).count() == 1
    assert [red.get_by_role("button", name=name, exact=True).inner_text()
            for name in ("Yes, it is DOG", "No, it is CAT", "No, neither")] == ["Yes", "CAT", "Neither"]

    # Two quick clicks on "No, it is CAT": one answer sent, stored, thanked for, and the buttons gone.
    red.get_by_role("button", name="No, it is CAT").dblclick()
    thanks = red.locator(".feedback-thanks")
    expect(thanks).to_have_text("Thanks — noted: it is CAT, not DOG.")
    expect(red.locator("button.feedback-choice")).to_have_count(0)
    assert red.locator(".tile-feedback").is_hidden()
    # The focus was on a button that is gone: it goes on from the thank-you, not the page's top.
    assert page.evaluate("() => document.activeElement.className") == "feedback-thanks"
    assert feedback_rows(one_feedback_server.uploads) == [(red_id, "CAT", 0)]
    assert page.evaluate("() => window.feedbackPosts") == 1
    assert "red.jpg: Thanks — noted: it is CAT, not DOG." in page.locator("#announcer").inner_text()

    # From the keyboard on the next tile: this address's one answer this hour is used up (429).
    blue.get_by_role("button", name="No, neither").focus()
    page.keyboard.press("Enter")
    error = blue.locator(".feedback-error")
    expect(error).to_be_visible()
    message = error.inner_text()
    assert "sent a lot of answers in the last hour" in message  # the server's message
    assert "Try again in an hour." in message                   # its hint
    assert re.search(r"Answers are taken again from \d{1,2}:\d{2}", message)  # from Retry-After: 3600
    assert message in page.locator("#announcer").inner_text()
    # The buttons stay (pressing again later makes sense), usable, with the focus where it was.
    buttons = blue.locator("button.feedback-choice")
    assert buttons.count() == 3 and buttons.evaluate_all("bs => bs.every(b => !b.hasAttribute('aria-disabled'))")
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "No, neither"
    assert blue.locator(".feedback-thanks").is_hidden()
    assert feedback_rows(one_feedback_server.uploads) == [(red_id, "CAT", 0)]
    assert serious_violations(page) == []
    context.close()
    assert errors == []


def test_an_answer_that_could_not_be_sent_can_be_sent_again(open_page, page_server):
    page = open_page()
    page.set_input_files("#file", [photo("offline.jpg", BLUE)])
    wait_finished(page, 1)
    blue = tile(page, "offline.jpg")
    blue_id = blue.locator("a.stored").get_attribute("href").rsplit("/", 1)[1]
    from playwright.sync_api import expect

    page.route("**/feedback", lambda route: route.abort("internetdisconnected"))
    yes = blue.get_by_role("button", name="Yes, it is CAT")
    yes.click()
    expect(blue.locator(".feedback-error")).to_contain_text("cannot be reached")
    page.unroute("**/feedback")
    page.route("**/feedback", lambda route: route.fulfill(
        status=503, content_type="application/json", headers={"Retry-After": "1"},
        body='{"error": {"status": 503, "message": "The upload store is not answering.", "hint": "Try again soon."}}'))
    yes.click()
    expect(blue.locator(".feedback-error")).to_have_text(re.compile(r"^The upload store is not answering\. Try again soon\."))
    page.unroute("**/feedback")
    yes.click()  # the same buttons, once more: now it is stored
    expect(blue.locator(".feedback-thanks")).to_have_text("Thanks — noted: it is CAT, as the model said.")
    assert blue.locator(".feedback-error").is_hidden()
    assert (blue_id, "CAT", 1) in feedback_rows(page_server.uploads)


# --- accessibility: axe-core (shipped inside the axe-playwright-python wheel, no CDN) ---------

def serious_violations(page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now, one line each."""
    from axe_playwright_python.sync_playwright import Axe

    # Axe evaluates its script through the DevTools protocol, which the page's CSP does not
    # govern: the page keeps its strict policy while it is checked.
    results = Axe().run(page)
    return [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_upload_page_before_and_after_results(open_page, scheme):
    page = open_page(color_scheme=scheme)
    assert serious_violations(page) == []
    page.set_input_files("#file", [photo("red.jpg", RED), photo("blue.jpg", BLUE),
                                   {"name": "bad.jpg", "mimeType": "image/jpeg", "buffer": b"nope"}])
    wait_finished(page, 3)
    page.set_input_files("#file", [photo(f"p{i}.jpg", RED) for i in range(MAX_FILES + 1)])
    wait_finished(page, 3 + MAX_FILES)  # the notice about the one left out shows too
    assert page.locator("#notice").is_visible()
    assert serious_violations(page) == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_result_and_error_pages(browser, page_server, scheme):
    # axe needs JavaScript, so "without JavaScript" here is: the page's script never arrives
    # (as on a flaky connection), which leaves the same plain form.
    context = browser.new_context(color_scheme=scheme)
    context.route("**/static/upload.js", lambda route: route.abort())
    page = context.new_page()
    page.goto(page_server.url + "/")
    assert page.locator(".picker").is_hidden() and page.locator("button[type=submit]").is_visible()
    assert serious_violations(page) == []
    page.set_input_files("#file", photo("red.jpg", RED))
    page.click("button[type=submit]")
    page.wait_for_selector("#label")
    assert serious_violations(page) == []
    page.goto(page_server.url + "/uploads/no-such-upload")
    assert page.locator("#message").is_visible()
    assert serious_violations(page) == []
    context.close()
