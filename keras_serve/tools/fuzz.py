"""Hostile images, made on the fly from a seed, sent to a running server.

    python -m keras_serve.tools.fuzz --url http://127.0.0.1:8080 --count 100000 --seed 7

Case `i` of seed `s` is always the same bytes (`case(s, i)`), so any surprise can be
reproduced from the two numbers the run prints. Kinds of case:
  valid      an allowed format in an odd mode (1, L, LA, P with transparency, CMYK, I;16, I, F ...)
  exif       a valid JPEG/PNG/WebP/TIFF with an odd EXIF orientation or oddly typed tags
  bitflip    a valid image with a few random bits flipped
  truncate   a valid image cut short
  header     a valid image with its width/height fields (or other header bytes) rewritten
  bomb       few bytes, many pixels: 7000x7000 WebP/AVIF/PNG/float TIFF, 65535^2 headers
  refused    a real image in a format outside the allow-list (PPM, TGA, PCX, SGI, QOI, ICO, ...)
  junk       random bytes, text, an empty file, an image behind a junk prefix

The server may answer only the statuses docs/reference.md documents for an upload (200, 400, 413, 415,
422); anything else, or a dropped connection, is reported with its seed and index, and the
run exits 1.
"""
from __future__ import annotations

import argparse
import functools
import http.client
import io
import random
import secrets
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from keras_serve.pipeline import preprocessing  # noqa: F401 - registers the HEIF opener (and encoder)

DOCUMENTED_STATUSES = frozenset({200, 400, 413, 415, 422})

ALLOWED = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "AVIF")
REFUSED = ("PPM", "TGA", "PCX", "SGI", "QOI", "ICO", "IM", "MSP", "SPIDER", "DDS", "BLP", "XBM", "JPEG2000")

# Modes each encoder accepts, so the generator does not waste cases on save errors.
MODES = {
    "JPEG": ("L", "RGB", "CMYK"),
    "PNG": ("1", "L", "LA", "P", "P+t", "RGB", "RGBA", "I;16"),
    "GIF": ("L", "P", "P+t"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("1", "L", "P", "RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
    "HEIF": ("RGB", "RGBA"),
    "AVIF": ("RGB", "RGBA"),
}
REFUSED_MODES = {"PPM": "RGB", "TGA": "RGB", "PCX": "RGB", "SGI": "RGB", "QOI": "RGBA", "ICO": "RGBA",
                 "IM": "RGB", "MSP": "1", "SPIDER": "F", "DDS": "RGBA", "BLP": "P", "XBM": "1",
                 "JPEG2000": "RGB"}

KINDS = (("valid", 20), ("exif", 10), ("bitflip", 22), ("truncate", 14), ("header", 14), ("bomb", 3),
         ("refused", 8), ("junk", 9))


@dataclass(frozen=True)
class Case:
    seed: int
    index: int
    kind: str
    description: str
    data: bytes


def case(seed: int, index: int) -> Case:
    """The index-th case of a seed: the same bytes every time."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    description, data = MAKERS[kind](rng)
    return Case(seed, index, kind, description, data)


def cases(seed: int, count: int, start: int = 0) -> Iterator[Case]:
    for index in range(start, start + count):
        yield case(seed, index)


# --- images ------------------------------------------------------------------------------
def _picture(rng: random.Random, mode: str, size: tuple[int, int]) -> Image.Image:
    """Smooth colours plus noise, so encoders produce realistic (not trivially small) streams."""
    w, h = size
    np_rng = np.random.default_rng(rng.getrandbits(32))
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1),
                    np.full_like(xs, rng.randrange(256))], axis=-1)
    rgb = np.clip(rgb + np_rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "P+t":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = rng.randrange(64)
        return image
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L"), np.uint16) * np.uint16(257))
    if mode == "I":
        return Image.fromarray(np.asarray(image.convert("L"), np.int32) * rng.choice((1, 1000, 100000)))
    if mode == "F":
        return Image.fromarray(np.asarray(image.convert("L"), np.float32) * np.float32(rng.choice((1.0, 1e-3, 1e6))))
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np_rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        image = image.convert(mode)
        image.putalpha(alpha)
        return image
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    if fmt in ("HEIF", "AVIF"):
        options.setdefault("quality", 50)
    if fmt == "AVIF":
        options.setdefault("speed", 10)
    image.save(buf, fmt, **options)
    return buf.getvalue()


# How often each format is picked: HEIF's encoder (x265) takes 70 ms an image, the others 1-15 ms.
FORMAT_WEIGHTS = {"JPEG": 4, "PNG": 4, "GIF": 3, "WEBP": 3, "BMP": 2, "TIFF": 4, "HEIF": 1, "AVIF": 2}


def valid_image(rng: random.Random, fmt: str | None = None) -> tuple[str, bytes]:
    fmt = fmt or rng.choices(ALLOWED, weights=[FORMAT_WEIGHTS[f] for f in ALLOWED])[0]
    mode = rng.choice(MODES[fmt])
    size = (rng.randint(1, 96) if rng.random() < 0.2 else rng.randint(16, 320), rng.randint(1, 240))
    options: dict = {}
    if fmt == "JPEG":
        options = {"quality": rng.randint(5, 95), "progressive": rng.random() < 0.3,
                   "subsampling": rng.choice((0, 1, 2))}
    elif fmt == "TIFF":
        options = {"compression": rng.choice((None, "tiff_lzw", "tiff_adobe_deflate", "packbits"))}
        if mode in ("1", "L", "RGB") and rng.random() < 0.2:
            options["compression"] = "jpeg" if mode != "1" else "group4"
    elif fmt == "WEBP":
        options = {"lossless": rng.random() < 0.5, "quality": rng.randint(0, 100)}
    elif fmt == "PNG":
        options = {"optimize": rng.random() < 0.2}
    image = _picture(rng, mode, size)
    return f"{fmt} {mode} {size[0]}x{size[1]}", _encode(image, fmt, **options)


def make_valid(rng: random.Random) -> tuple[str, bytes]:
    return valid_image(rng)


# Values that have crashed EXIF handling: wrong types, out-of-range orientations.
ODD_ORIENTATIONS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 255, 65535, -1, 6.5, "6", b"\x06", (6, 6), (6,))
ODD_TAGS = (
    (0x010E, 1.5), (0x010E, (1, 2, 3)), (0x0131, b"\xff" * 40), (0x011A, "seventy-two"),
    (0x011A, (72, 0)), (0x9286, 12345), (0x8769, 999999), (0xA002, "wide"), (0x0213, (1, 2)),
    (0x0112, (6, 7)), (0x8825, -5), (0xC4A5, b"\x00" * 3),
)


def make_exif(rng: random.Random) -> tuple[str, bytes]:
    fmt = rng.choice(("JPEG", "PNG", "WEBP", "TIFF"))
    image = _picture(rng, "RGB", (rng.randint(8, 200), rng.randint(8, 200)))
    orientation = rng.choice(ODD_ORIENTATIONS)
    if rng.random() < 0.5:  # entries of random types: Pillow's own exif_transpose raised on these
        fmt = "JPEG" if fmt == "TIFF" else fmt
        return f"{fmt} raw exif orientation={orientation!r}", _encode(image, fmt, exif=_raw_exif(rng, orientation))
    exif = Image.Exif()
    tags = rng.sample(ODD_TAGS, rng.randint(0, 3))
    for tag, value in [(0x0112, orientation), *tags]:
        exif[tag] = value
    description = f"{fmt} exif orientation={orientation!r} tags={[hex(t) for t, _ in tags]}"
    try:
        return description, _encode(image, fmt, exif=exif)
    except Exception:  # Pillow cannot write some of these types: hand-craft the EXIF block, which
        # JPEG, PNG and WebP store verbatim (TIFF would re-parse it)
        fmt = "JPEG" if fmt == "TIFF" else fmt
        return f"{fmt} raw exif orientation={orientation!r}", _encode(image, fmt, exif=_raw_exif(rng, orientation))


def _raw_exif(rng: random.Random, orientation) -> bytes:
    """A little-endian TIFF header with one IFD whose entries have random types and counts."""
    entries = [(0x0112, rng.choice((1, 3, 4, 5, 7, 12)), rng.choice((1, 2, 0xFFFF)),
                orientation if isinstance(orientation, int) and 0 <= orientation < 2**16 else 6)]
    for _ in range(rng.randint(0, 6)):
        entries.append((rng.randrange(2**16), rng.randint(0, 14), rng.choice((0, 1, 4, 9, 2**20)),
                        rng.randrange(2**32)))
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, typ, count, value & 0xFFFFFFFF) for tag, typ, count, value in entries)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


# --- mutations ---------------------------------------------------------------------------
def make_bitflip(rng: random.Random) -> tuple[str, bytes]:
    description, data = valid_image(rng)
    mutated = bytearray(data)
    flips = rng.choice((1, 2, 4, 16, 64))
    # Headers are where parsers make decisions: flip there more often than in the payload.
    span = min(len(mutated), rng.choice((64, 512, len(mutated))))
    for _ in range(flips):
        mutated[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return f"{description} with {flips} bit(s) flipped in the first {span} bytes", bytes(mutated)


def make_truncate(rng: random.Random) -> tuple[str, bytes]:
    description, data = valid_image(rng)
    cut = rng.choice((rng.randrange(1, max(2, len(data))), len(data) - 1, len(data) // 2, 8, 32))
    cut = max(1, min(cut, len(data) - 1))
    return f"{description} cut to {cut} of {len(data)} bytes", data[:cut]


BIG_SIDES = (0, 1, 7000, 16383, 16384, 65535, 2**31 - 1, 2**32 - 1)


def make_header(rng: random.Random) -> tuple[str, bytes]:
    fmt = rng.choice(("PNG", "GIF", "BMP", "JPEG", "WEBP", "TIFF"))
    description, data = valid_image(rng, fmt)
    w, h = rng.choice(BIG_SIDES), rng.choice(BIG_SIDES)
    data = bytearray(data)
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", w, h)
        if rng.random() < 0.8:  # a correct CRC gets the lie past the chunk check
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", w & 0x7FFFFFFF, (h & 0x7FFFFFFF) * rng.choice((1, -1)))
    elif fmt == "JPEG":
        at = data.find(b"\xff\xc0") if b"\xff\xc0" in data else data.find(b"\xff\xc2")
        if at > 0:
            data[at + 5:at + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    else:  # WebP, TIFF: overwrite a random header word
        at = rng.randrange(min(len(data) - 4, 40))
        data[at:at + 4] = struct.pack("<I", rng.choice((w, h)) & 0xFFFFFFFF)
    return f"{description} header says {w}x{h}", bytes(data)


@functools.lru_cache(maxsize=None)
def _bomb(kind: str) -> bytes:
    """Few bytes, many pixels. Built once per process: some take a second to encode."""
    side = 7000
    if kind == "webp-7000":
        return _encode(Image.new("RGB", (side, side)), "WEBP", lossless=True, quality=0, method=0)
    if kind == "avif-7000":
        return _encode(Image.new("RGB", (side, side)), "AVIF")
    if kind == "png-rgba-7000":
        return _encode(Image.new("RGBA", (side, side), (1, 2, 3, 4)), "PNG", compress_level=9)
    if kind == "tiff-float-7000":
        return _encode(Image.new("F", (side, side), 0.5), "TIFF", compression="tiff_adobe_deflate")
    if kind == "tiff-one-strip-3000":  # libtiff's strip buffer is the whole image
        return _encode(Image.new("F", (3000, 3000), 0.5), "TIFF", compression="tiff_adobe_deflate",
                       strip_size=2**31 - 1)
    if kind == "jpeg-progressive-7000":
        return _encode(Image.new("RGB", (side, side)), "JPEG", progressive=True, quality=10)
    if kind == "gif-8000":
        return _encode(Image.new("P", (8000, 6000)), "GIF")
    if kind == "png-header-65535":
        ihdr = struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\x00" * 65536)
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                + _png_chunk(b"IEND", b""))
    raise KeyError(kind)


BOMBS = ("webp-7000", "avif-7000", "png-rgba-7000", "tiff-float-7000", "tiff-one-strip-3000",
         "jpeg-progressive-7000", "gif-8000", "png-header-65535")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def make_bomb(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(BOMBS)
    return f"bomb {kind}", _bomb(kind)


def make_refused(rng: random.Random) -> tuple[str, bytes]:
    fmt = rng.choice(REFUSED)
    size = (rng.randint(8, 64), rng.randint(8, 64))
    image = _picture(rng, REFUSED_MODES[fmt], size)
    return f"refused {fmt} {size[0]}x{size[1]}", _encode(image, fmt)


def make_junk(rng: random.Random) -> tuple[str, bytes]:
    choice = rng.randrange(5)
    if choice == 0:
        return "empty", b""
    if choice == 1:
        return "random bytes", rng.randbytes(rng.randint(1, 4096))
    if choice == 2:
        return "text", ("not an image " * rng.randint(1, 200)).encode()
    if choice == 3:  # a magic number and nothing behind it
        magic = rng.choice((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                            b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x1cftypheic", b"\x00\x00\x00\x1cftypavif"))
        return f"magic {magic!r} only", magic + rng.randbytes(rng.randint(0, 64))
    description, data = valid_image(rng)
    return f"{description} behind a junk prefix", rng.randbytes(rng.randint(1, 16)) + data


MAKERS: dict[str, Callable[[random.Random], tuple[str, bytes]]] = {
    "valid": make_valid, "exif": make_exif, "bitflip": make_bitflip, "truncate": make_truncate,
    "header": make_header, "bomb": make_bomb, "refused": make_refused, "junk": make_junk,
}


# --- sending -----------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no answer (connection dropped, timed out)
    detail: str = ""


class Uploader:
    """One keep-alive connection posting multipart uploads, reconnecting when the server closes."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = (parts.path.rstrip("/") or "") + "/file/"
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, data: bytes, filename: str = "upload.bin") -> tuple[int, bytes]:
        boundary = "------------------------" + secrets.token_hex(8)
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json"}
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", self.path, body=body, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, payload
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()  # the server may close an idle keep-alive connection: retry once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send(url: str, items: Iterable[Case], concurrency: int = 4,
         on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Post every case with `concurrency` keep-alive clients; returns the outcomes in order."""
    source = iter(items)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def worker() -> None:
        uploader = Uploader(url)
        try:
            while True:
                with lock:
                    item = next(source, None)
                if item is None:
                    return
                try:
                    status, payload = uploader.post(item.data)
                    outcome = Outcome(item, status, payload[:300].decode("utf-8", "replace"))
                except Exception as exc:  # noqa: BLE001 - every failure to answer is a finding
                    uploader.close()
                    outcome = Outcome(item, None, f"{type(exc).__name__}: {exc}")
                with lock:
                    outcomes.append(outcome)
                    if on_outcome:
                        on_outcome(outcome)
        finally:
            uploader.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: o.case.index)


def alive(url: str, timeout: float = 5.0) -> bool:
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first case index (to resume or reproduce)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--save-unexpected", metavar="DIR", help="write the bytes of every unexpected case here")
    args = p.parse_args(argv)

    started = time.monotonic()
    by_kind: dict[str, Counter] = {}
    unexpected: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        by_kind.setdefault(outcome.case.kind, Counter())[outcome.status] += 1
        if outcome.status not in DOCUMENTED_STATUSES:
            unexpected.append(outcome)
            print(f"UNEXPECTED seed {outcome.case.seed} index {outcome.case.index} ({outcome.case.description}): "
                  f"{outcome.status} {outcome.detail}", flush=True)
        done = sum(sum(c.values()) for c in by_kind.values())
        if done % 1000 == 0:
            print(f"{done} sent, {time.monotonic() - started:.0f} s", flush=True)

    send(args.url, cases(args.seed, args.count, args.start), args.concurrency, record)
    for kind, counter in sorted(by_kind.items()):
        print(f"{kind:9} " + ", ".join(f"{status}: {n}" for status, n in sorted(counter.items(), key=str)))
    if args.save_unexpected and unexpected:
        from pathlib import Path

        folder = Path(args.save_unexpected)
        folder.mkdir(parents=True, exist_ok=True)
        for outcome in unexpected:
            (folder / f"seed{outcome.case.seed}-{outcome.case.index}.bin").write_bytes(outcome.case.data)
    is_alive = alive(args.url)
    print(f"{args.count} cases in {time.monotonic() - started:.1f} s; {len(unexpected)} unexpected; "
          f"server {'alive' if is_alive else 'NOT answering /healthz'}")
    return 0 if not unexpected and is_alive else 1


if __name__ == "__main__":
    sys.exit(main())
