"""Make docs/img/review.png: the review page with real photos, the way docs/review.md shows it.

    .venv/bin/python tests/review_screenshot.py [docs/img/review.png [PHOTO_ROOT]]

Starts the real server with the shipped model, uploads a dozen validation photos from
../shared/data/cats_vs_dogs (never committed), reviews a few through the API, leaves one
visitor's feedback, logs in with Chromium and takes the screenshot. Not a test.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DEFAULT_MODEL, SHARED_DATA  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

TOKEN = "screenshot-token-0123456789abcdef"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/review.png")
    root = Path(sys.argv[2]) if len(sys.argv) > 2 else SHARED_DATA  # a worktree's ../shared may be elsewhere
    photos = [*sorted((root / "validation" / "cats").iterdir())[:7],
              *sorted((root / "validation" / "dogs").iterdir())[:7]]
    photos = [p for pair in zip(photos[:7], photos[7:]) for p in pair]  # cats and dogs mixed
    with tempfile.TemporaryDirectory() as folder, \
            ServerProcess("--model", str(DEFAULT_MODEL), "--upload-dir", folder,
                          env={"KERAS_SERVE_ADMIN_TOKEN": TOKEN}) as server:
        answers = []
        for photo in photos:
            r = requests.post(server.url + "/file/", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
            r.raise_for_status()
            answers.append(r.json())
        bearer = {"Authorization": f"Bearer {TOKEN}", "X-Reviewer": "ana"}
        truth = {a["id"]: "CAT" if photo.parent.name == "cats" else "DOG" for a, photo in zip(answers, photos)}
        least_sure = sorted(answers, key=lambda a: a["confidence"])
        for answer in (least_sure[0], answers[-1]):  # the reviewer gives the true label (from the folder)
            requests.post(f"{server.url}/api/uploads/{answer['id']}/review", json={"label": truth[answer["id"]]},
                          headers=bearer, timeout=10).raise_for_status()
        requests.post(f"{server.url}/uploads/{least_sure[1]['id']}/feedback", data={"label": "neither"},
                      timeout=10).raise_for_status()

        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url + "/review/login")
            page.fill("#name", "ana")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#grid .card")
            page.goto(server.url + "/review?order=least_sure")
            for _ in range(100):  # until every thumbnail has loaded (a polling script would need unsafe-eval)
                if page.eval_on_selector_all("#grid img", "imgs => imgs.every(i => i.complete && i.naturalWidth)"):
                    break
                page.wait_for_timeout(100)
            page.keyboard.press("ArrowRight")
            page.screenshot(path=str(out), full_page=False)
            browser.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
