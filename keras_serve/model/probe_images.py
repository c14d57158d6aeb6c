"""The images a candidate model answers before it may serve (keras_serve/model/candidate_check.py).

Random noise alone hides models that fail on ordinary photos: noise averages to mid-grey, so a
model ending in an exponential answers ~0 for it and Infinity for a white photo. The probes are
the extremes a real upload reaches (all white, all black), mid-grey, gradients, saturated
colours, photo-like scenes (a sky over grass with texture), noise, and the photos in
CANDIDATE_PROBE_DIR when an operator names a folder of their own.
Each is encoded as PNG and goes through the server's own decoding and scaling.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

SIZE = (96, 72)  # width, height; the server resizes to the model's input as it does uploads
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MOST_PHOTOS = 8  # from CANDIDATE_PROBE_DIR: enough to see a real photo, few enough to stay quick


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _plain(colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (SIZE[1], SIZE[0], 3)).copy()


def _gradient() -> np.ndarray:
    ramp = np.linspace(0, 255, SIZE[0])
    grey = np.broadcast_to(ramp, (SIZE[1], SIZE[0]))
    return np.stack([grey, grey[:, ::-1], np.full_like(grey, 128)], axis=-1)


def _landscape(seed: int) -> np.ndarray:
    """A sky over grass with a sun and texture: smooth regions, edges and detail as in photos."""
    rng = np.random.default_rng(seed)
    height, width = SIZE[1], SIZE[0]
    rows = np.linspace(0, 1, height)[:, None]
    sky = np.stack([120 + 80 * rows, 170 + 60 * rows, np.full_like(rows, 240)], -1) * np.ones((1, width, 1))
    grass = np.stack([40 + 30 * rows, 110 + 60 * rows, 30 + 10 * rows], -1) * np.ones((1, width, 1))
    horizon = int(height * rng.uniform(0.45, 0.65))
    image = np.where(np.arange(height)[:, None, None] < horizon, sky, grass)
    yy, xx = np.mgrid[0:height, 0:width]
    sun = (yy - height * 0.2) ** 2 + (xx - width * rng.uniform(0.2, 0.8)) ** 2 < (height * 0.1) ** 2
    image[sun] = (255, 240, 200)
    image += rng.normal(0, 12, image.shape)  # texture and sensor noise
    return np.clip(image, 0, 255)


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE[1], SIZE[0], 3))


def synthesized() -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of the built-in probes."""
    return [
        ("white", _png(_plain((255, 255, 255)))),
        ("black", _png(_plain((0, 0, 0)))),
        ("mid-grey", _png(_plain((128, 128, 128)))),
        ("gradient", _png(_gradient())),
        ("saturated red", _png(_plain((255, 0, 0)))),
        ("saturated blue", _png(_plain((0, 0, 255)))),
        ("landscape", _png(_landscape(1))),
        ("landscape 2", _png(_landscape(2))),
        ("noise", _png(_noise(0))),
    ]


def from_folder(folder: str | Path | None) -> Iterator[tuple[str, bytes]]:
    """Up to MOST_PHOTOS photos from `folder` (sorted by name), named by their file name."""
    if not folder:
        return
    root = Path(folder)
    if not root.is_dir():
        return
    photos = sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    for photo in photos[:MOST_PHOTOS]:
        yield photo.name, photo.read_bytes()


def probes(folder: str | Path | None = None) -> list[tuple[str, bytes]]:
    return [*synthesized(), *from_folder(folder)]
