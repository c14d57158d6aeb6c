"""Screenshots of the upload page with results, on a phone (390 px) and a desktop (1280 × 1024 px).

    python -m keras_serve.tools.page_screenshots --url http://127.0.0.1:8080 --out docs/img

Drives Debian's Chromium (Playwright, as the browser tests do) against a running server: sends
a few validation photos through the page, switches two heatmaps on, answers "Was this right?"
with yes on the first tile (so the server stores one feedback row per view: use a scratch
server), and saves page-phone.png and page-desktop.png, reduced to a 256-colour palette so the
PNGs stay small. The photos are read from --photos and never written anywhere but into the
screenshots.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from keras_serve.settings import PROJECT_ROOT

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
FINISHED = ".tile[data-state=done], .tile[data-state=unsure], .tile[data-state=failed]"
VIEWS = {
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
              "device_scale_factor": 2},
    "desktop": {"viewport": {"width": 1280, "height": 1024}},  # tall enough for a whole row of tiles
}


def pick_photos(folder: Path, per_class: int) -> list[Path]:
    """The first `per_class` photos (by name) of each class folder, interleaved."""
    classes = [sorted(p for p in d.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:per_class]
               for d in sorted(folder.iterdir()) if d.is_dir()]
    return [photo for group in zip(*classes) for photo in group]


def small_png(png: bytes, path: Path) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def capture(url: str, photos: list[Path], out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        for name, context_args in VIEWS.items():
            context = browser.new_context(**context_args)
            page = context.new_page()
            page.goto(url.rstrip("/") + "/")
            page.set_input_files("#file", [str(p) for p in photos])
            expect(page.locator(FINISHED)).to_have_count(len(photos), timeout=60_000)
            for tile in page.locator(".tile").all()[:2]:
                tile.locator(".heatmap-toggle").click()
                expect(tile.locator("img.heatmap")).to_be_visible(timeout=60_000)
            first = page.locator(".tile").first
            first.locator("button.feedback-choice").first.click()  # "Yes, it is <its label>"
            expect(first.locator(".feedback-thanks")).to_be_visible(timeout=30_000)
            page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
            # What a person scrolls through: each tile's height and the whole page's (docs/page.md).
            tiles = page.locator(".tile").evaluate_all("ts => ts.map(t => Math.round(t.getBoundingClientRect().height))")
            height = page.evaluate("() => document.documentElement.scrollHeight")
            print(f"{name}: {len(tiles)} tiles of {sorted(tiles)} px (two with the heatmap on), page {height} px")
            path = out / f"page-{name}.png"
            small_png(page.screenshot(), path)
            saved.append(path)
            context.close()
        browser.close()
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--photos", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation",
                        help="a folder with one sub-folder of photos per class")
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    for path in capture(args.url, pick_photos(args.photos, args.per_class), args.out, args.chromium):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
