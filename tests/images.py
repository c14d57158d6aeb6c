"""Images the tests make themselves."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

RED, BLUE = (220, 20, 20), (20, 20, 220)


def image_bytes(colour=RED, size=(64, 48), fmt="JPEG", mode="RGB", **save_args) -> bytes:
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def noise_jpeg(size=(640, 480), seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
