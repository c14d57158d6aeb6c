"""Hostile images: the format allow-list, odd EXIF, and the memory each decode may take."""
from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import threading

import pytest
from PIL import Image, ImageOps

from images import BLUE, RED
from server_process import ROOT
from uploading import post_file
from keras_serve.errors import DecodeBusyError, ImageTooLargeError
from keras_serve.pipeline.decode_budget import DecodeBudget
from keras_serve.pipeline.preprocessing import (ALLOWED_FORMATS, PreprocessSpec, decode_image,
                                                exif_orientation)
from keras_serve.tools import fuzz

SPEC = PreprocessSpec()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_from_its_real_encoder_is_classified(client, fmt):
    red = encode(Image.new("RGB", (96, 64), RED), fmt)
    blue = encode(Image.new("RGB", (96, 64), BLUE), fmt)
    assert Image.open(io.BytesIO(red)).format == fmt  # the encoder really wrote this format
    answers = [post_file(client, data, f"photo.{fmt.lower()}") for data in (red, blue)]
    assert [r.status_code for r in answers] == [200, 200], [r.get_json() for r in answers]
    assert [r.get_json()["class"] for r in answers] == ["DOG", "CAT"]  # the colour model: red DOG, blue CAT


@pytest.mark.parametrize("fmt", fuzz.REFUSED)
def test_formats_outside_the_allow_list_are_415_although_pillow_reads_them(client, fmt):
    data = encode(fuzz._picture(random.Random(0), fuzz.REFUSED_MODES[fmt], (40, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format  # Pillow itself would open it
    response = post_file(client, data, "photo.jpg")
    assert response.status_code == 415, response.get_json()
    assert response.get_json()["error"]["code"] == "not_an_image"


def jpeg_with_raw_exif(image: Image.Image, entries: list[tuple[int, int, int, int]]) -> bytes:
    """A JPEG whose EXIF IFD holds exactly these (tag, type, count, value) entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return encode(image, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4)


def red_left_blue_right() -> Image.Image:
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(Image.new("RGB", (100, 100), RED), (0, 0))
    return image


def test_orientation_is_applied_even_when_another_tag_has_a_type_pillow_cannot_rewrite():
    # Orientation 6 (rotate 90 CW: red ends on top) plus ImageDescription stored as a RATIONAL.
    data = jpeg_with_raw_exif(red_left_blue_right(), [(0x0112, 3, 1, 6), (0x010E, 5, 1, 5)])
    with pytest.raises(AttributeError):  # what answered HTTP 500 before
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    pixels = decode_image(data, SPEC)
    top, bottom = pixels[:60], pixels[90:]
    assert top[..., 0].mean() > 180 and top[..., 2].mean() < 80
    assert bottom[..., 2].mean() > 180 and bottom[..., 0].mean() < 80


@pytest.mark.parametrize("entry", [
    (0x0112, 2, 4, 0x36),          # orientation as ASCII text "6"
    (0x0112, 5, 1, 8),             # as a RATIONAL (pointing past the end of the block)
    (0x0112, 3, 1, 9),             # out of range
])
def test_an_orientation_that_cannot_be_read_means_as_stored(entry):
    data = jpeg_with_raw_exif(red_left_blue_right(), [entry])
    assert exif_orientation(Image.open(io.BytesIO(data))) == 1
    pixels = decode_image(data, SPEC)
    left, right = pixels[:, :60], pixels[:, 90:]
    assert left[..., 0].mean() > 180 and right[..., 2].mean() > 180


def test_decode_cost_refuses_a_tiny_webp_bomb_before_decoding_it():
    bomb = fuzz._bomb("webp-7000")
    assert len(bomb) < 4096
    budget = DecodeBudget(2**40)
    with pytest.raises(ImageTooLargeError, match="needs about .* MiB; the limit is 384 MiB"):
        decode_image(bomb, SPEC, budget)
    assert budget.in_use_bytes == 0


def test_a_smaller_decode_limit_refuses_what_the_default_lets_through():
    png = encode(Image.new("RGBA", (2000, 1500), (1, 2, 3, 4)), "PNG")
    assert decode_image(png, SPEC).shape == (150, 150, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(png, PreprocessSpec(max_decode_bytes=16 * 2**20))


# Each file decoded in a fresh process: the peak RSS it adds must stay within decode_cost
# (plus a little for Python objects), or the budget would not bound what it claims to.
PEAK_PROGRAM = """
import io, json, resource, sys
from PIL import Image
from keras_serve.pipeline.preprocessing import PreprocessSpec, decode_cost, decode_image
data = sys.stdin.buffer.read()
spec = PreprocessSpec(max_decode_bytes=2**40)
image = Image.open(io.BytesIO(data)); full = image.size; image.draft("RGB", (150, 150))
cost = decode_cost(image, full); image.close()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_image(data, spec)
print(json.dumps({"cost": cost, "peak": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""


@pytest.mark.parametrize("make", [
    lambda: encode(Image.new("RGBA", (3000, 3000), (1, 2, 3, 4)), "PNG"),
    lambda: encode(Image.new("F", (3000, 3000), 0.5), "TIFF", compression="tiff_adobe_deflate", strip_size=2**31 - 1),
    lambda: encode(Image.new("RGB", (3000, 3000)), "WEBP", lossless=True),
    lambda: encode(Image.new("RGB", (4000, 4000)), "JPEG", progressive=True),
    lambda: encode(Image.new("P", (4000, 3000)), "GIF"),
    lambda: encode(Image.new("1", (6000, 6000)), "BMP"),
    lambda: encode(Image.new("RGB", (3000, 3000)), "AVIF", speed=10),
    lambda: encode(Image.new("RGB", (3000, 3000)), "HEIF"),
], ids=["png-rgba", "tiff-float-one-strip", "webp", "jpeg-progressive", "gif", "bmp-1bit", "avif", "heif"])
def test_decoding_allocates_no_more_than_its_estimated_cost(make):
    result = subprocess.run([sys.executable, "-c", PEAK_PROGRAM], input=make(), capture_output=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    measured = json.loads(result.stdout)
    assert measured["cost"] > 30 * 2**20  # big enough for the comparison to mean something
    assert measured["peak"] <= measured["cost"] + 12 * 2**20, measured


def test_budget_makes_large_decodes_take_turns():
    budget = DecodeBudget(100, wait_seconds=30)  # a broken budget fails the test rather than hang it
    order = []
    a_in, release_a, b_in = threading.Event(), threading.Event(), threading.Event()

    def hold(name: str, nbytes: int, entered: threading.Event, until: threading.Event | None) -> None:
        with budget.reserve(nbytes):
            order.append(f"{name} in")
            entered.set()
            if until is not None:
                until.wait(30)  # holds its bytes until the test lets go; the bound only ends a hang
            order.append(f"{name} out")

    first = threading.Thread(target=hold, args=("a", 70, a_in, release_a))
    first.start()
    assert a_in.wait(30)
    second = threading.Thread(target=hold, args=("b", 70, b_in, None))
    second.start()
    with budget.reserve(30):  # a small one fits beside the first and does not wait
        order.append("small")
    # b cannot get in while a holds 70 of 100, however long it is given (this only makes a
    # broken budget more likely to show; a working one passes whatever the timing)
    assert not b_in.wait(0.2)
    release_a.set()
    first.join(30)
    second.join(30)
    assert order == ["a in", "small", "a out", "b in", "b out"]
    assert budget.in_use_bytes == 0


def test_budget_gives_back_on_errors_and_refuses_after_waiting_too_long():
    budget = DecodeBudget(100, wait_seconds=0.05)
    with pytest.raises(ValueError):
        with budget.reserve(80):
            raise ValueError("decoder failed")
    assert budget.in_use_bytes == 0
    with budget.reserve(80):
        with pytest.raises(DecodeBusyError):
            with budget.reserve(30):
                pass
        with pytest.raises(DecodeBusyError):  # more than the whole budget waits for all of it
            with budget.reserve(500):
                pass
    assert budget.in_use_bytes == 0


def test_budget_larger_than_capacity_runs_alone():
    budget = DecodeBudget(100, wait_seconds=1)
    with budget.reserve(500):
        assert budget.in_use_bytes == 100


def test_busy_decode_budget_is_503_with_retry_after(make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path), DECODE_BUDGET_BYTES=64 * 2**20, DECODE_WAIT_SECONDS=0.05)
    png = encode(Image.new("RGB", (1000, 1000), RED), "PNG")  # costs about 4 MB to decode
    with app.extensions["classifier"].decode_budget.reserve(64 * 2**20):
        busy = post_file(app.test_client(), png, "big.png")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
    assert busy.get_json()["error"]["code"] == "decode_busy"
    assert post_file(app.test_client(), png, "big.png").status_code == 200


def test_model_and_records_name_the_model_file_without_its_folder(client, colour_model_path):
    assert client.get("/model").get_json()["file"] == "colour.h5"
    answer = post_file(client, encode(Image.new("RGB", (40, 40), RED), "PNG")).get_json()
    record = client.get(f"/uploads/{answer['id']}/record").get_json()
    assert record["model"] == "colour.h5"
    assert str(colour_model_path.parent) not in json.dumps(record)


def test_multi_picture_jpeg_from_cameras_is_a_jpeg_and_its_first_picture_is_used(client):
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), RED).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (96, 64), BLUE)])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    response = post_file(client, buf.getvalue(), "camera.jpg")
    assert response.status_code == 200 and response.get_json()["class"] == "DOG"
