"""The model-quality dashboard in a real browser, at a phone's width (390 px) and a desktop's (1280 px).

Debian's Chromium through Playwright, as tests/test_browser.py; without Chromium this skips
(`apt-get install chromium`), except where REQUIRE_BROWSER=1 (CI), where it fails. The store is
filled before the server starts: two weeks of a model's answers with drift in the second, reviews,
visitors' answers, a second version and a promotion with its rollback.
With KERAS_SERVE_SCREENSHOT_DIR=docs/img it also saves the screenshots docs/dashboard.md shows.
"""
from __future__ import annotations

import os
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

from chromium import launch, require_chromium
from server_process import ServerProcess

require_chromium()

TOKEN = "browser-dashboard-token-0123456789"
OTHER = "e" * 64
WIDTHS = {"phone": (390, 844), "desktop": (1280, 1500)}


def fill_store(upload_dir: Path, model_path: Path) -> None:
    """A fortnight of answers: the first week sure and balanced, the second less sure and mostly DOG."""
    from keras_serve.model.engines import file_sha256
    from keras_serve.storage.records import RecordStore, model_promotions, sqlite_url
    from keras_serve.storage.reviewing import ReviewStore

    sha = file_sha256(model_path)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    rng = random.Random(7)
    records = RecordStore(sqlite_url(upload_dir))
    rows, reviewed = [], []
    for n in range(700):
        age = timedelta(days=14 * (1 - n / 700), minutes=rng.randint(0, 50))
        drifted = age < timedelta(days=7)
        label = "DOG" if rng.random() < (0.75 if drifted else 0.5) else "CAT"
        confidence = min(0.999, max(0.5, rng.gauss(0.78 if drifted else 0.92, 0.1)))
        failed = rng.random() < 0.01
        rows.append({"id": f"{n:032x}", "received": now - age, "bytes": 1000, "sha256": "0" * 64,
                     "image_key": f"k/{n}.png", "format": "PNG", "model": model_path.name, "model_sha256": sha,
                     "prediction": None if failed else {"label": label, "confidence": confidence},
                     "predicted_label": None if failed else label, "confidence": None if failed else confidence,
                     "milliseconds": None if failed else rng.lognormvariate(3.0, 0.4),
                     "error": "The model failed to answer." if failed else None})
        if not failed and rng.random() < 0.3:
            right = rng.random() < confidence - 0.05
            reviewed.append((f"{n:032x}", label if right else ("CAT" if label == "DOG" else "DOG")))
    for n in range(40):
        rows.append({"id": f"{1000 + n:032x}", "received": now - timedelta(days=3, hours=n / 10), "bytes": 1000,
                     "sha256": "0" * 64, "image_key": f"k/o{n}.png", "format": "PNG", "model": "candidate.h5",
                     "model_sha256": OTHER, "prediction": {"label": "DOG", "confidence": 0.9},
                     "predicted_label": "DOG", "confidence": 0.9, "milliseconds": 25.0, "error": None})
    for row in rows:
        records.insert(row)
    reviews = ReviewStore(records)
    reviews.review(reviewed, "ana")
    for i, (upload_id, label) in enumerate(reviewed[-60:]):
        reviews.add_feedback(upload_id, label if i % 5 else "neither", f"visitor{i}", per_hour=100)
    with records.engine.begin() as conn:
        conn.execute(model_promotions.insert(), [
            {"sha256": OTHER, "action": "promote", "by": "ana", "created": now - timedelta(days=3, hours=4)},
            {"sha256": None, "action": "rollback", "by": "ana", "created": now - timedelta(days=2, hours=20)}])
    records.close()


def test_dashboard_at_phone_and_desktop_width(colour_model_path, tmp_path):
    from playwright.sync_api import sync_playwright

    uploads = tmp_path / "uploads"
    fill_store(uploads, colour_model_path)
    shots = Path(os.environ.get("KERAS_SERVE_SCREENSHOT_DIR") or tmp_path)
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(uploads),
                       env={"KERAS_SERVE_ADMIN_TOKEN": TOKEN}) as server, sync_playwright() as p:
        browser = launch(p)
        for name, (width, height) in WIDTHS.items():
            context = browser.new_context(viewport={"width": width, "height": height},
                                          extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
            page = context.new_page()
            refused = []
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
            failed = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            answer = page.goto(server.url + "/admin?window=week")
            assert answer.status == 200
            page.wait_for_load_state("networkidle")
            images = page.eval_on_selector_all("figure img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            assert len(images) == 6 and all(done and w > 0 for done, w in images), images
            # nothing wider than the screen: the tables scroll inside their own box
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            api = context.request.get(server.url + "/api/stats?window=week").json()
            assert api["traffic"]["uploads"] > 300 and api["reviewed"]["count"] > 50
            assert page.inner_text("#headline [data-stat=uploads]") == str(api["traffic"]["uploads"])
            assert "first week" in page.inner_text("#drift-sentence")
            assert refused == [] and failed == []
            page.screenshot(path=str(shots / f"dashboard-{name}.png"), full_page=False)
            context.close()
        browser.close()
    assert (shots / "dashboard-phone.png").stat().st_size > 10_000
