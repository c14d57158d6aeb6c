"""What the load generator sends: real JPEGs (or synthetic ones), a phone-sized photo, and
multipart bodies with a fresh boundary per request."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from keras_serve.web.multipart_form import fresh_boundary, multipart_body  # noqa: F401 (the benchmark sends these)

PHONE_SIZE = (4032, 3024)



@dataclass
class ImageSet:
    paths: list[Path]
    source: str            # where they came from, for the report
    synthetic: bool


def find_images(folder: Path, limit: int, scratch: Path) -> ImageSet:
    """Up to `limit` JPEGs from folder, classes interleaved; synthetic ones if it is absent."""
    if folder.is_dir():
        by_class = [sorted(p for p in sub.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
                    for sub in sorted(folder.iterdir()) if sub.is_dir()]
        by_class = [c for c in by_class if c] or [sorted(folder.glob("*.jp*g"))]
        # Interleave so every slice of the list has both classes (the server sees a mix).
        interleaved = [p for group in itertools.zip_longest(*by_class) for p in group if p is not None]
        if interleaved:
            return ImageSet(interleaved[:limit], str(folder), synthetic=False)
    return ImageSet(make_synthetic_jpegs(scratch / "synthetic", min(limit, 64)),
                    f"{min(limit, 64)} synthetic JPEGs ({folder} not found)", synthetic=True)


def make_synthetic_jpegs(folder: Path, count: int) -> list[Path]:
    """Photo-sized JPEGs with gradients and noise, so decode cost resembles real photos."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        width, height = (500, 375) if i % 2 else (375, 500)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{i:03d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def make_phone_photo(source: Path, destination: Path) -> Path:
    """A 4032x3024 JPEG like a phone camera's: an upscaled real photo plus sensor-like noise,
    quality 90, EXIF orientation 6 (portrait shot), so it costs what a real one costs."""
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        big = image.convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC)
    pixels = np.asarray(big, dtype=np.uint8).copy()
    rng = np.random.default_rng(1)
    # In row chunks: full-frame float noise would need ~300 MB.
    for start in range(0, pixels.shape[0], 256):
        chunk = pixels[start:start + 256].astype(np.int16)
        chunk += rng.integers(-12, 13, size=chunk.shape, dtype=np.int16)
        pixels[start:start + 256] = np.clip(chunk, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(pixels).save(destination, quality=90, exif=exif.tobytes())
    return destination


# ----------------------------------------------------------------------------------------
# Step 1: raw model (runs in a child process: `benchmark.py --_raw-out FILE ...`)
# ----------------------------------------------------------------------------------------

@dataclass
class Upload:
    data: bytes
    name: str

    def request(self) -> tuple[bytes, dict[str, str]]:
        """Body and headers with a fresh boundary, as curl, requests and browsers send: Werkzeug
        compiles two regular expressions per new boundary, and a fixed one would hide that."""
        boundary = fresh_boundary()
        body = multipart_body("file", self.name, "image/jpeg", self.data, boundary)
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json"}


