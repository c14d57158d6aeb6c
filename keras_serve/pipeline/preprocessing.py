"""The one path from image bytes to a model input array.

Server, training, evaluation and tests all call these functions, so they cannot disagree
about decoding, orientation, colour mode, size or scaling.

Two stages, so training and evaluation can cache the expensive one:
  decode_image(bytes, spec) -> uint8 array (H, W, C)      decode, orient, convert, resize
  to_model_input(uint8 batch, spec) -> float32 batch       scaling and layout
and `preprocess(bytes, spec)` composes both and adds the batch axis.

Memory: before any pixel is decoded, the header tells how much the decode will allocate
(`decode_cost`); over `spec.max_decode_bytes` the image is refused (413), otherwise that much
is reserved from a `DecodeBudget` shared by all requests for as long as the full-size pixels
exist. Right after decoding, the image is box-reduced to about twice the model's input, so
orientation, colour conversion and resizing only ever touch small images.
"""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pillow_heif
from PIL import Image, UnidentifiedImageError

from keras_serve.pipeline.decode_budget import UNLIMITED, DecodeBudget
from keras_serve.errors import CorruptImageError, EmptyImageError, ImageTooLargeError, NotAnImageError, ServiceError

log = logging.getLogger(__name__)

# Part of every cache key for decoded images: bump it whenever decode_image changes output.
DECODER_VERSION = 3

# A 48 MP phone photo passes; anything larger is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 50_000_000
# Measured peaks of 50 MP images: a float TIFF 200 MB, an RGBA PNG 390 MB (decode, then
# Image.reduce's premultiplied copy), a lossless WebP 790 MB. The first two pass.
DEFAULT_MAX_DECODE_BYTES = 384 * 2**20

# Pillow names of the containers we decode; everything else is refused (415) without being
# parsed further. HEIC/HEIF comes from pillow-heif (iPhones send it), AVIF is Pillow's own.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "AVIF")
pillow_heif.register_heif_opener()

# Peak bytes a decoder allocates per byte of the decoded image, measured by decoding
# 7000x7000 images in a fresh process (peak RSS): libwebp keeps two RGBA canvases and hands
# Pillow a copy; libavif and libheif decode to YUV planes and then convert. The others
# decode straight into Pillow's image (TIFF's strip buffer and progressive JPEG's
# coefficients are added separately, from the header).
DECODER_OVERHEAD = {"WEBP": 4.0, "AVIF": 2.5, "HEIF": 2.2}

ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}

# How pixels 0..255 become model inputs: name -> (multiply, then add).
SCALINGS: dict[str, tuple[float, float]] = {
    "1/255": (1.0 / 255.0, 0.0),   # [0, 1], the Keras-blog recipe and our default model
    "none": (1.0, 0.0),            # model rescales inside itself
    "-1..1": (1.0 / 127.5, -1.0),  # MobileNet / Inception style
}


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects: spatial size, channel count and layout, pixel scaling; input limits."""

    height: int = 150
    width: int = 150
    channels: int = 3
    scaling: str = "1/255"
    channels_first: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; choose one of {', '.join(SCALINGS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"models with {self.channels} input channels are not supported (1 or 3)")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.channels_first:
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


def decode_image(data: bytes, spec: PreprocessSpec, budget: DecodeBudget = UNLIMITED) -> np.ndarray:
    """Decode by content, apply EXIF orientation, convert to RGB/L, resize to the model's size.

    Returns uint8 (height, width, channels). Raises ImageError subclasses for bad input, and
    DecodeBusyError if `budget` stays exhausted; nothing else, whatever the bytes.
    """
    target = "RGB" if spec.channels == 3 else "L"
    try:
        with open_image(data, spec) as image:
            full_size = image.size
            # For JPEG, decode at the smallest power-of-two scale still >= the target size: the
            # decoder's DCT scaling is itself an antialiased downscale, so a 12 MP photo decodes
            # 8x smaller and a 500 px photo 2x smaller, several times faster, for a mean change
            # of about 1 grey level after the final resize.
            image.draft(target, (spec.width, spec.height))
            cost = decode_cost(image, full_size)
            if cost > spec.max_decode_bytes:
                raise ImageTooLargeError(
                    f"Decoding this {image.width}x{image.height} {image.format} image needs about "
                    f"{cost / 2**20:,.0f} MiB; the limit is {spec.max_decode_bytes / 2**20:,.0f} MiB.")
            with budget.reserve(cost):
                try:
                    image.load()
                    orientation = exif_orientation(image)
                    # 16-bit grey maps its full range to 8 bits; 32-bit int and float their maximum.
                    grey_peak = 65535.0 if image.mode.startswith("I;16") else None
                    small = _shrink(image, spec, orientation)
                finally:
                    image.close()  # the full-size pixels go before the reservation does
        small = _to_mode(_orient(small, orientation), target, grey_peak)
        if small.size != (spec.width, spec.height):
            small = small.resize((spec.width, spec.height), Image.Resampling.BILINEAR, reducing_gap=None)
        array = np.asarray(small, dtype=np.uint8)
    except ServiceError:
        raise
    except MemoryError:
        raise ImageTooLargeError("The image needs more memory to decode than the server allows.") from None
    except Exception as exc:  # decoders raise assorted errors on damaged data
        log.debug("decoder refused an image: %s: %s", type(exc).__name__, exc)
        raise CorruptImageError(f"The image data is truncated or corrupt ({type(exc).__name__}).") from None
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return array


@contextmanager
def open_image(data: bytes, spec: PreprocessSpec) -> Iterator[Image.Image]:
    """Image.open restricted to ALLOWED_FORMATS, with the pixel limit checked from the header."""
    if not data:
        raise EmptyImageError("The uploaded file is empty.")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and 2x; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"The image has too many pixels ({exc}).") from None
    except UnidentifiedImageError:
        raise NotAnImageError("The uploaded file is not an image in a supported format.") from None
    except Exception as exc:  # Pillow raises assorted errors on mangled headers
        raise CorruptImageError(f"The image header is damaged ({type(exc).__name__}).") from None
    with image:
        width, height = image.size
        if width * height > spec.max_pixels:
            raise ImageTooLargeError(
                f"The image is {width}x{height} = {width * height:,} pixels; the limit is {spec.max_pixels:,}.")
        if width < 1 or height < 1:
            raise CorruptImageError("The image has no pixels.")
        yield image


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel in `mode` (3-channel modes are padded to 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_cost(image: Image.Image, full_size: tuple[int, int] | None = None) -> int:
    """Peak bytes that loading `image` and reducing it will allocate, from its header alone.

    `full_size` is the size before a JPEG `draft`, if one was set.
    """
    width, height = image.size
    pixels = width * height
    cost = pixels * pixel_bytes(image.mode) * DECODER_OVERHEAD.get(image.format or "", 1.0)
    reduced_mode = _reducible_mode(image)
    if reduced_mode != image.mode:
        cost += pixels * pixel_bytes(reduced_mode)
    if reduced_mode in ("LA", "RGBA"):
        cost += pixels * 4  # Image.reduce premultiplies alpha into a full-size copy first
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        # libjpeg buffers every DCT coefficient (2 bytes) of a progressive JPEG at full size,
        # whatever scale it decodes at.
        full_width, full_height = full_size or image.size
        cost += full_width * full_height * 2 * _jpeg_samples_per_pixel(image)
    if image.format == "TIFF":
        cost += _tiff_buffer_bytes(image)
    return int(cost)


def _jpeg_samples_per_pixel(image: Image.Image) -> float:
    """Components per pixel after chroma subsampling (3 for 4:4:4, 1.5 for 4:2:0)."""
    layers = getattr(image, "layer", None) or []
    if not layers:
        return 4.0
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)


def _tiff_buffer_bytes(image: Image.Image) -> int:
    """libtiff decodes one strip or tile at a time into a buffer of its own."""
    tags = getattr(image, "tag_v2", {})
    row_bytes = image.width * pixel_bytes(image.mode)
    try:
        if 322 in tags and 323 in tags:
            return int(tags[322]) * int(tags[323]) * pixel_bytes(image.mode)
        rows = min(int(tags.get(278, image.height)), image.height)
        return rows * row_bytes
    except (TypeError, ValueError):
        return image.height * row_bytes


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation 1..8; 1 (as stored) whenever the metadata cannot be read.

    A photo whose metadata is odd is still a photo: tags of unexpected types make Pillow's
    EXIF parser raise struct.error, TypeError, ValueError and others, none of which should
    stop the image from being classified.
    """
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if type(value) is int and value in _TRANSPOSE_FOR_ORIENTATION else 1


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return image if method is None else image.transpose(method)


def _shrink(image: Image.Image, spec: PreprocessSpec, orientation: int) -> Image.Image:
    """Box-average by whole factors down to no less than twice the model's input.

    What Pillow's `reducing_gap=2` does, done first so that everything after works on a small
    image; the final bilinear resize then sees at most 4x its output, where box-then-bilinear
    is indistinguishable from resampling the full image.
    """
    out_w, out_h = (spec.height, spec.width) if orientation >= 5 else (spec.width, spec.height)
    factor_x = max(1, image.width // (2 * out_w))
    factor_y = max(1, image.height // (2 * out_h))
    if factor_x == 1 and factor_y == 1:
        return image.copy()  # small already; a copy so the caller can free the decoded one
    mode = _reducible_mode(image)
    if mode != image.mode:  # convert() copies even when the mode is the same
        image = image.convert(mode)
    return image.reduce((factor_x, factor_y))


def _reducible_mode(image: Image.Image) -> str:
    """The mode to average `image` in: Image.reduce cannot average palette indices, bits or
    16-bit ints."""
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return {"PA": "RGBA", "1": "L"}.get(image.mode, "I" if image.mode.startswith("I;16") else image.mode)


def _to_mode(image: Image.Image, target: str, grey_peak: float | None = None) -> Image.Image:
    """Convert any Pillow mode to RGB or L; transparent areas become white, not black."""
    if image.mode == target:
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert(target)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Wide grey: map the full range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        peak = grey_peak or (65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0))
        grey = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), "L")
        return grey.convert(target)
    return image.convert(target)


def scale_pixels(batch: np.ndarray, scaling: str) -> np.ndarray:
    """Map uint8 pixels to the model's numeric range (float32), shape unchanged."""
    multiply, add = SCALINGS[scaling]
    out = batch.astype(np.float32) * np.float32(multiply)
    if add:
        out += np.float32(add)
    return out


def to_layout(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """NHWC -> the model's layout."""
    return np.transpose(batch, (0, 3, 1, 2)) if spec.channels_first else batch


def to_model_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, C) from `decode_image` -> float32 in the model's scaling and layout."""
    return to_layout(scale_pixels(pixels, spec.scaling), spec)


def preprocess(data: bytes, spec: PreprocessSpec, budget: DecodeBudget = UNLIMITED) -> np.ndarray:
    """Image bytes -> float32 array of shape (1, *spec.input_shape), ready for the model."""
    return to_model_input(decode_image(data, spec, budget)[np.newaxis], spec)


def image_format(data: bytes) -> str | None:
    """Pillow's name for the container format ("JPEG", "PNG", ...) from the header alone."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            return image.format
    except Exception:
        return None
