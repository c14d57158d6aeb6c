"""The upload page's three example pictures, drawn with Pillow: a cat, a dog and a mug.

    python -m keras_serve.tools.example_photos            # writes static/examples/*.jpg

They are simple drawings, not photos, made here so the project ships no one else's pictures;
the page offers them for a first try without a photo at hand (docs/page.md). The shipped cat/dog
model may well be unsure about drawings: that is part of what a first try shows. Re-running this
writes the same bytes (no randomness), so the files in git stay as they are.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from keras_serve.settings import PROJECT_ROOT

SIZE = (320, 240)
QUALITY = 82


def _background(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(SIZE[1]):
        t = y / (SIZE[1] - 1)
        draw.line([(0, y), (SIZE[0], y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def cat() -> Image.Image:
    image = _background((196, 220, 236), (150, 180, 200))
    d = ImageDraw.Draw(image)
    fur, dark, pink = (222, 150, 74), (160, 95, 40), (236, 150, 160)
    d.polygon([(100, 95), (112, 30), (150, 78)], fill=fur, outline=dark, width=3)    # ears
    d.polygon([(220, 95), (208, 30), (170, 78)], fill=fur, outline=dark, width=3)
    d.polygon([(110, 85), (116, 48), (138, 76)], fill=pink)
    d.polygon([(210, 85), (204, 48), (182, 76)], fill=pink)
    d.ellipse([90, 60, 230, 200], fill=fur, outline=dark, width=3)                   # head
    for x in (110, 150, 190):                                                      # tabby stripes
        d.line([(x + 10, 66), (x + 14, 92)], fill=dark, width=5)
    for cx in (132, 188):                                                          # eyes
        d.ellipse([cx - 14, 108, cx + 14, 134], fill=(120, 190, 80), outline=(40, 40, 30), width=2)
        d.ellipse([cx - 4, 110, cx + 4, 132], fill=(20, 20, 20))
    d.polygon([(150, 148), (170, 148), (160, 160)], fill=pink, outline=dark)          # nose
    d.line([(160, 160), (160, 170)], fill=dark, width=2)
    d.arc([140, 160, 160, 180], 0, 180, fill=dark, width=2)
    d.arc([160, 160, 180, 180], 0, 180, fill=dark, width=2)
    for dy in (-8, 0, 8):                                                          # whiskers
        d.line([(138, 162 + dy), (70, 155 + 2 * dy)], fill=(60, 50, 40), width=2)
        d.line([(182, 162 + dy), (250, 155 + 2 * dy)], fill=(60, 50, 40), width=2)
    return image.filter(ImageFilter.SMOOTH)


def dog() -> Image.Image:
    image = _background((214, 236, 200), (120, 170, 90))
    d = ImageDraw.Draw(image)
    fur, dark, ear = (176, 120, 70), (90, 55, 25), (110, 70, 35)
    d.ellipse([95, 45, 225, 195], fill=fur, outline=dark, width=3)                   # head
    d.ellipse([62, 60, 118, 170], fill=ear, outline=dark, width=3)                   # floppy ears
    d.ellipse([202, 60, 258, 170], fill=ear, outline=dark, width=3)
    d.ellipse([122, 130, 198, 200], fill=(232, 212, 180), outline=dark, width=2)     # snout
    d.ellipse([146, 132, 174, 154], fill=(30, 25, 25))                               # nose
    d.line([(160, 154), (160, 176)], fill=(30, 25, 25), width=3)
    d.arc([136, 166, 184, 190], 20, 160, fill=(30, 25, 25), width=3)
    d.ellipse([154, 180, 170, 204], fill=(220, 90, 110))                             # tongue
    for cx in (132, 188):                                                          # eyes
        d.ellipse([cx - 10, 92, cx + 10, 114], fill=(40, 25, 15))
        d.ellipse([cx - 4, 96, cx + 1, 102], fill=(250, 250, 250))
    return image.filter(ImageFilter.SMOOTH)


def mug() -> Image.Image:
    image = _background((245, 236, 220), (205, 185, 160))
    d = ImageDraw.Draw(image)
    d.rectangle([0, 190, SIZE[0], SIZE[1]], fill=(150, 105, 70))                     # table
    d.ellipse([210, 95, 265, 165], outline=(40, 110, 170), width=12)                 # handle
    d.rounded_rectangle([105, 70, 225, 200], radius=14, fill=(60, 140, 200), outline=(30, 80, 130), width=3)
    d.ellipse([105, 60, 225, 82], fill=(70, 45, 30), outline=(30, 80, 130), width=3)  # coffee
    for x in (140, 165, 190):                                                      # steam
        d.arc([x - 10, 20, x + 10, 55], 90, 270, fill=(170, 170, 170), width=3)
    return image.filter(ImageFilter.SMOOTH)


EXAMPLES = {"cat.jpg": cat, "dog.jpg": dog, "mug.jpg": mug}


def write_examples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in EXAMPLES.items():
        path = folder / name
        draw().save(path, "JPEG", quality=QUALITY, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "static" / "examples")
    args = parser.parse_args(argv)
    for path in write_examples(args.out):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
