import io

import numpy as np
import pytest
from PIL import Image

from keras_serve.errors import CorruptImageError, EmptyImageError, ImageTooLargeError, NotAnImageError
from images import BLUE, RED, image_bytes, noise_jpeg
from keras_serve.pipeline.preprocessing import PreprocessSpec, decode_image, image_format, preprocess

SPEC = PreprocessSpec()  # the default model's: 150x150 RGB, 1/255


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_output_shape_dtype_and_scale():
    x = preprocess(image_bytes(RED, (500, 375)), SPEC)
    assert x.shape == (1, 150, 150, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # JPEG shifts colours a little; red stays red.
    assert x[0, ..., 0].mean() > 0.8 and x[0, ..., 2].mean() < 0.15


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    base = Image.new("RGB", (40, 30), RED)
    image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "YCbCr", "LA") else "PNG"
    x = preprocess(save(image, fmt), SPEC)
    assert x.shape == (1, 150, 150, 3)
    if mode in ("RGBA", "P", "CMYK", "YCbCr"):
        assert x[0, ..., 0].mean() > 0.75 and x[0, ..., 2].mean() < 0.2, mode
    else:  # grey modes: all three channels equal
        assert np.allclose(x[0, ..., 0], x[0, ..., 2])


def test_sixteen_bit_grey_uses_full_range():
    values = np.full((20, 20), 65535 // 2, dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I;16")
    x = preprocess(save(image, "PNG"), SPEC)
    assert 0.45 < x.mean() < 0.55  # not clipped to white, not crushed to black


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    x = preprocess(save(image, "PNG"), SPEC)
    assert x.min() > 0.99


def test_palette_with_transparency():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0] * 256)
    x = preprocess(save(image, "PNG", transparency=0), SPEC)
    assert x.min() > 0.99


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored with EXIF "rotate 90 CW to display" (6):
    # displayed, red is on top.
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(Image.new("RGB", (100, 100), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    x = preprocess(save(image, "JPEG", exif=exif.tobytes(), quality=95), SPEC)[0]
    top, bottom = x[:60], x[90:]
    assert top[..., 0].mean() > 0.7 and top[..., 2].mean() < 0.3
    assert bottom[..., 2].mean() > 0.7 and bottom[..., 0].mean() < 0.3


@pytest.mark.parametrize("size", [(1, 1), (3000, 7), (7, 3000), (151, 149), (150, 150)])
def test_odd_sizes(size):
    x = preprocess(image_bytes(RED, size, "PNG"), SPEC)
    assert x.shape == (1, 150, 150, 3)


def test_other_sizes_layouts_and_scalings():
    data = image_bytes((255, 255, 255), (50, 40), "PNG")
    assert preprocess(data, PreprocessSpec(32, 64, 3)).shape == (1, 32, 64, 3)
    assert preprocess(data, PreprocessSpec(32, 64, 3, channels_first=True)).shape == (1, 3, 32, 64)
    grey = preprocess(data, PreprocessSpec(28, 28, 1))
    assert grey.shape == (1, 28, 28, 1) and grey.max() == pytest.approx(1.0)
    assert preprocess(data, PreprocessSpec(8, 8, 3, "none")).max() == pytest.approx(255.0)
    assert preprocess(data, PreprocessSpec(8, 8, 3, "-1..1")).max() == pytest.approx(1.0)
    assert preprocess(image_bytes((0, 0, 0), fmt="PNG"), PreprocessSpec(8, 8, 3, "-1..1")).min() == pytest.approx(-1.0)


def test_large_jpeg_decodes_reduced_to_same_answer():
    # draft() decodes a big JPEG at reduced scale; the result must match a full decode closely.
    big = noise_jpeg((2400, 1800), quality=95)
    fast = decode_image(big, SPEC).astype(np.float32)
    full = np.asarray(Image.open(io.BytesIO(big)).convert("RGB").resize((150, 150), Image.Resampling.BILINEAR,
                                                                        reducing_gap=None), np.float32)
    assert np.abs(fast.mean() - full.mean()) < 2.0


def test_twelve_megapixel_photo_passes():
    x = preprocess(image_bytes(RED, (4032, 3024), "JPEG"), SPEC)
    assert x.shape == (1, 150, 150, 3)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(EmptyImageError):
        preprocess(b"", SPEC)
    with pytest.raises(NotAnImageError):
        preprocess(b"%PDF-1.4 definitely not a picture", SPEC)
    jpeg = image_bytes(RED, (400, 300))
    with pytest.raises(CorruptImageError):
        preprocess(jpeg[: len(jpeg) // 2], SPEC)
    with pytest.raises(CorruptImageError):
        preprocess(jpeg[:40], SPEC)


def test_pixel_limit_stops_decompression_bombs_before_decoding():
    bomb = image_bytes((0, 0, 0), (12000, 12000), "PNG", mode="L")  # 144 MP, a few hundred KB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLargeError, match="144,000,000"):
        preprocess(bomb, SPEC)
    with pytest.raises(ImageTooLargeError):
        preprocess(image_bytes(RED, (100, 100), "PNG"), PreprocessSpec(max_pixels=9_999))


def test_image_format_sniffs_content_not_names():
    assert image_format(image_bytes(fmt="PNG")) == "PNG"
    assert image_format(image_bytes(fmt="JPEG")) == "JPEG"
    assert image_format(b"GIF89a but not really") is None
