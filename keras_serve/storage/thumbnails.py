"""Thumbnails for the review grid: 256 px WebP, made once per upload and kept in a local cache.

The cache is `<upload dir>/.thumbnails/<first 2 hex of the id>/<id>.webp`: a folder the image
stores never list (they only walk `YYYY/MM/DD`), named from an id that was pattern-checked and
found in the database. Each replica keeps its own cache; a thumbnail is a few KB and is made
again from the upload whenever it is missing, so losing the folder loses nothing.

Cost: making one decodes the stored image once (JPEGs at a reduced scale through Pillow's
draft mode); at most MAKERS thumbnails are made at once, so a grid of 200 new uploads cannot
take more than MAKERS decodes' worth of memory.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from keras_serve.errors import UploadNotFound
from keras_serve.storage.uploads import UploadStore, is_upload_id

log = logging.getLogger(__name__)

SIZE = 256
QUALITY = 80
MAKERS = 2


class ThumbnailCache:
    def __init__(self, store: UploadStore, folder: str | Path) -> None:
        self.store = store
        self.folder = Path(folder)
        self._makers = threading.BoundedSemaphore(MAKERS)

    def get(self, upload_id: str) -> bytes:
        """The WebP thumbnail of an upload. Raises UploadNotFound (also for an undecodable image)."""
        if not is_upload_id(upload_id):
            raise UploadNotFound("That is not an upload id.")
        path = self.folder / upload_id[:2] / f"{upload_id}.webp"
        try:
            return path.read_bytes()
        except OSError:
            pass
        data, _ = self.store.read_image(upload_id)  # checks the row, the size and the sha256
        with self._makers:
            thumbnail = make_thumbnail(data)
        if thumbnail is None:
            raise UploadNotFound(f"Upload {upload_id} has no picture to show.")
        self._keep(path, thumbnail)
        return thumbnail

    def forget(self, upload_ids) -> None:
        """Drop the thumbnails of uploads that were deleted (retention)."""
        for upload_id in upload_ids:
            if is_upload_id(upload_id):
                try:
                    (self.folder / upload_id[:2] / f"{upload_id}.webp").unlink(missing_ok=True)
                except OSError:
                    pass

    def _keep(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
            temp.write_bytes(data)
            os.replace(temp, path)  # a reader never sees half a file
        except OSError as exc:
            log.warning("thumbnail cache %s is not writable (%s); serving without keeping it", self.folder,
                        exc.strerror)


def make_thumbnail(data: bytes, size: int = SIZE) -> bytes | None:
    """At most `size` x `size`, upright (EXIF orientation applied), WebP; None if it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale directly
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            out = io.BytesIO()
            image.save(out, "WEBP", quality=QUALITY)
            return out.getvalue()
    except Exception:  # stored bytes of a kind Pillow cannot show (an imported .bin, a damaged file)
        log.info("no thumbnail for an upload Pillow cannot decode", exc_info=True)
        return None
