"""Several images in one POST /file/: {"results": [...]} in order, each its own answer or error."""
from datetime import datetime

import requests

from images import BLUE, RED, image_bytes
from uploading import post_file, post_files
from keras_serve.storage.uploads import is_upload_id
from keras_serve.web.routes import display_filename

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
SINGLE_ANSWER_KEYS = {"class", "label", "confidence", "scores", "top", "unsure", "id", "image_url", "milliseconds",
                     "model_version"}


def stored_ids(app) -> set[str]:
    return {upload_id for upload_id, _ in
            app.extensions["classifier"].store.records.older_than(datetime(3000, 1, 1))}


def test_several_files_answer_in_the_order_sent_through_the_shared_batcher(client, app):
    batcher = app.extensions["classifier"].batcher
    images_before = batcher.items
    r = post_files(client, [("a.jpg", image_bytes(RED)), ("b.png", image_bytes(BLUE, fmt="PNG")),
                            ("c.jpg", image_bytes(RED, (300, 200)))])
    assert r.status_code == 200 and r.is_json
    results = r.get_json()["results"]
    assert [item["label"] for item in results] == ["DOG", "CAT", "DOG"]
    for item in results:
        assert set(item) == SINGLE_ANSWER_KEYS | {"filename"}  # a single upload's answer, and which file
        assert is_upload_id(item["id"]) and client.get(item["image_url"]).status_code == 200
    assert [item["filename"] for item in results] == ["a.jpg", "b.png", "c.jpg"]
    assert len({item["id"] for item in results}) == 3
    assert stored_ids(app) == {item["id"] for item in results}
    assert client.get(results[1]["image_url"]).data == image_bytes(BLUE, fmt="PNG")
    assert batcher.items - images_before == 3
    assert batcher.announced == 0  # every announcement settled


def test_one_bad_file_does_not_fail_the_others(client, app):
    r = post_files(client, [("good.jpg", image_bytes(RED)), ("notes.txt", b"just some text"),
                            ("dir/../empty.jpg", b""), ("blue.jpg", image_bytes(BLUE))])
    assert r.status_code == 200
    good, not_image, empty, blue = r.get_json()["results"]
    assert good["label"] == "DOG" and blue["label"] == "CAT"
    assert good["filename"] == "good.jpg" and blue["filename"] == "blue.jpg"
    assert not_image == {"error": not_image["error"], "filename": "notes.txt"}
    assert not_image["error"]["request_id"] == r.headers["X-Request-ID"]  # quoted per item, as a single error
    assert not_image["error"]["code"] == "not_an_image" and not_image["error"]["status"] == 415
    assert not_image["error"]["message"] and not_image["error"]["hint"]
    assert empty["error"]["code"] == "empty_image" and empty["filename"] == "empty.jpg"
    assert stored_ids(app) == {good["id"], blue["id"]}  # nothing rejected is stored


def test_all_files_bad_answers_the_first_errors_status(client, app):
    r = post_files(client, [("a.txt", b"text"), ("b.jpg", b"")])
    assert r.status_code == 415
    assert [item["error"]["code"] for item in r.get_json()["results"]] == ["not_an_image", "empty_image"]
    assert stored_ids(app) == set()
    r = post_files(client, [("b.jpg", b""), ("a.txt", b"text")])
    assert r.status_code == 400


def test_too_many_files_is_413_and_stores_nothing(make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path), MAX_FILES_PER_REQUEST=3)
    client = app.test_client()
    r = post_files(client, [(f"{i}.jpg", image_bytes(RED)) for i in range(4)])
    assert r.status_code == 413
    error = r.get_json()["error"]
    assert error["code"] == "too_many_files" and "at most 3" in error["message"] and "fewer files" in error["hint"]
    assert stored_ids(app) == set()
    assert post_files(client, [(f"{i}.jpg", image_bytes(RED)) for i in range(3)]).status_code == 200


def test_a_single_file_answers_exactly_as_before(client):
    body = post_file(client, image_bytes(RED)).get_json()
    assert set(body) == SINGLE_ANSWER_KEYS and body["label"] == "DOG"
    r = post_files(client, [("only.jpg", b"text")])
    assert r.status_code == 415 and r.get_json()["error"]["code"] == "not_an_image"  # no "results" wrapper


def test_browsers_get_a_page_listing_every_result(client):
    r = post_files(client, [("red.jpg", image_bytes(RED)), ("<img src=x onerror=alert(1)>.txt", b"text"),
                            ("blue.jpg", image_bytes(BLUE))], headers=HTML)
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert page.count('<li class="result">') == 2 and page.count('<li class="result result-error">') == 1
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.txt" in page
    assert page.index('class="label">DOG<') < page.index("not an image") < page.index('class="label">CAT<')
    for src in page.split('class="result-image" src="')[1:]:
        assert client.get(src.split('"')[0]).status_code == 200


def test_display_filename_keeps_only_a_harmless_last_segment():
    assert display_filename("C:\\Users\\me\\cat.jpg") == "cat.jpg"
    assert display_filename("../../etc/pass\x00wd\u202e.jpg") == "passwd.jpg"
    assert display_filename("猫.jpg") == "猫.jpg"
    assert display_filename("dir/") is None and display_filename(None) is None
    assert len(display_filename("a" * 1000)) == 255


# --- over real HTTP: python app.py (the colour model, a 1 MB body limit) ---------------------

def test_several_files_over_http(server):
    files = [("file", ("red.jpg", image_bytes(RED))), ("file", ("bad.gif", b"GIF89a broken")),
             ("file", ("blue.png", image_bytes(BLUE, fmt="PNG")))]
    r = requests.post(server.url + "/file/", files=files, timeout=60)
    assert r.status_code == 200
    red, bad, blue = r.json()["results"]
    assert red["label"] == "DOG" and blue["label"] == "CAT" and red["unsure"] is False
    assert bad["filename"] == "bad.gif" and bad["error"]["status"] in (415, 422)
    assert requests.get(server.url + blue["image_url"], timeout=10).content == image_bytes(BLUE, fmt="PNG")
    single = requests.post(server.url + "/file/", files={"file": ("red.jpg", image_bytes(RED))}, timeout=60)
    assert single.status_code == 200 and set(single.json()) == SINGLE_ANSWER_KEYS


def test_limits_over_http(server):
    small = image_bytes(RED, (16, 16))
    r = requests.post(server.url + "/file/", files=[("file", (f"{i}.jpg", small)) for i in range(21)], timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"
    # Their total is capped by the body limit (1 MB here), even when each alone would fit.
    half = b"\xff\xd8" + b"0" * 600_000
    r = requests.post(server.url + "/file/", files=[("file", ("a.jpg", half)), ("file", ("b.jpg", half))], timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert requests.post(server.url + "/file/", files={"file": ("x.jpg", small)}, timeout=60).status_code == 200
