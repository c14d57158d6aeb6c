"""Heatmaps of stored uploads: Grad-CAM made on demand, one at a time, kept in a bounded cache.

What `GET /uploads/<id>/heatmap.png` answers: a PNG with a transparent background, the shape
(aspect ratio) of the stored image as people see it (EXIF orientation applied), its longer
side at most HEATMAP_MAX_SIDE pixels. Where the model looked is coloured (blue, little, to
red, most) and more opaque; where it did not, fully transparent. A page shows it by stacking it
over the photo and stretching it to the photo's box (`position: absolute; inset: 0;
width: 100%; height: 100%`), and switches it on and off by hiding that one element. The model
sees the whole image squeezed to its input size (aspect not kept), so the stretched map lines up.

Costs. At most one heatmap is computed per process at a time (a lock; a request that cannot
get it within HEATMAP_WAIT_SECONDS is answered 503 with Retry-After): one forward and
backward pass of the Keras model in TensorFlow, plus one decode of the stored image under the
server's decode budget, so classification keeps the rest of the CPU. Finished PNGs stay in an
in-process LRU cache of at most HEATMAP_CACHE_BYTES, keyed by the model file's sha256 and the
upload id; uploads never change, so an entry is never stale, and a restart only recomputes.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from PIL import Image

from keras_serve.errors import HeatmapBusyError, NoConvolutionLayerError
from keras_serve.pipeline.decode_budget import UNLIMITED, DecodeBudget
from keras_serve.pipeline.preprocessing import exif_orientation, open_image, preprocess

HEATMAP_MAX_SIDE = 512
HEATMAP_CACHE_BYTES = 32 * 1024 * 1024
# Colour by heat, in RGB, evenly spaced from 0 to 1 ("jet"-like: blue, cyan, green, yellow, red).
PALETTE = np.array([(0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)], np.float32)
MAX_OPACITY = 0.7  # the hottest spot still lets the photo show through


class LruBytesCache:
    """A thread-safe LRU of bytes values, bounded by their total size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


def colour_overlay(cam: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A [0, 1] map on the conv grid -> RGBA image of `size` (width, height): coloured by heat,
    opacity growing with heat, transparent where the map is 0."""
    heat = np.asarray(Image.fromarray(cam.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    position = heat * (len(PALETTE) - 1)
    low = np.minimum(position.astype(np.int32), len(PALETTE) - 2)
    fraction = (position - low)[..., np.newaxis]
    rgb = PALETTE[low] * (1 - fraction) + PALETTE[low + 1] * fraction
    alpha = MAX_OPACITY * 255 * heat
    rgba = np.dstack([rgb, alpha]).round().astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def overlay_size(data: bytes, spec: Any, max_side: int = HEATMAP_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the stored image as shown (EXIF orientation applied), scaled so the
    longer side is at most `max_side`."""
    with open_image(data, spec) as image:
        width, height = image.size
        if exif_orientation(image) >= 5:  # rotated a quarter turn
            width, height = height, width
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class HeatmapMaker:
    """Grad-CAM PNGs for stored images of one served model; see the module docstring."""

    def __init__(self, model: Any, decode_budget: DecodeBudget = UNLIMITED, wait_s: float = 10.0,
                 cache_bytes: int = HEATMAP_CACHE_BYTES) -> None:
        self.model = model
        self.decode_budget = decode_budget
        self.wait_s = wait_s
        self.cache = LruBytesCache(cache_bytes)
        self.model_key = getattr(model, "file_sha256", None) or f"object-{id(model):x}"
        self._turn = threading.Lock()  # one heatmap at a time in this process
        self._gradcam: Any = None
        self._unavailable: NoConvolutionLayerError | None = None
        self.computed = 0  # heatmaps made (not served from the cache); for tests and status

    def etag(self, upload_id: str) -> str:
        """The entity tag (unquoted) of an upload's heatmap: changes with the model file."""
        return f"{self.model_key[:16]}-{upload_id}"

    def png(self, upload_id: str, read_image: Callable[[], bytes]) -> bytes:
        """The heatmap of upload `upload_id`, whose stored bytes `read_image()` returns (called
        only on a cache miss). Raises NoConvolutionLayerError, HeatmapBusyError, or what reading
        or decoding raises."""
        key = (self.model_key, upload_id)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self._unavailable is not None:
            raise self._unavailable
        if not self._turn.acquire(timeout=self.wait_s):
            raise HeatmapBusyError(f"Another heatmap is being made; this one waited {self.wait_s:g} s.")
        try:
            cached = self.cache.get(key)  # made while this request waited for its turn
            if cached is not None:
                return cached
            png = self._make(read_image())
            self.cache.put(key, png)
            self.computed += 1
            return png
        finally:
            self._turn.release()

    def _make(self, data: bytes) -> bytes:
        gradcam = self._load()
        x = preprocess(data, self.model.spec, self.decode_budget)  # exactly what classification sees
        cam, _ = gradcam(x)
        image = colour_overlay(cam, overlay_size(data, self.model.spec))
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()

    def _load(self) -> Any:
        """The Grad-CAM function, built on first use (the model is already loaded; tracing is not)."""
        if self._gradcam is None:
            from keras_serve.model.gradcam import GradCam

            keras_model = getattr(self.model, "model", None)
            try:
                if keras_model is None or not hasattr(keras_model, "layers"):
                    raise NoConvolutionLayerError("The served model is not a Keras model, so no heatmap can be made.")
                self._gradcam = GradCam(keras_model, self.model.spec.input_shape, self.model.output_kind,
                                        self.model.labels, getattr(self.model, "threshold", 0.5),
                                        logits_out=getattr(self.model, "_apply_activation", None) is not None)
            except NoConvolutionLayerError as exc:
                self._unavailable = exc
                raise
        return self._gradcam
