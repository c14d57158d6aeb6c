"""Posting uploads as real clients encode them (RFC 7578), for every test that sends a file."""
from __future__ import annotations

import requests

from keras_serve.web.multipart_form import fresh_boundary, multipart_body  # noqa: F401 (tests import them from here)


def post_file(client, data: bytes | None, filename: str = "photo.jpg", headers: dict | None = None,
              path: str = "/file/"):
    """POST `data` in the field 'file' through a Flask test client, with a fresh boundary.

    Werkzeug's test-client encoder writes an empty part without the CRLF before the closing
    delimiter, which no real client does and python-multipart rightly rejects; so the body is
    built here. `data=None` sends a form with no file part at all.
    """
    if data is None:
        return client.post(path, data={}, headers=headers or {}, content_type="multipart/form-data")
    boundary = fresh_boundary()
    body = multipart_body("file", filename, "application/octet-stream", data, boundary)
    return client.post(path, data=body, headers=headers or {},
                       content_type=f"multipart/form-data; boundary={boundary}")


def post_over_http(base_url: str, data: bytes, filename: str = "x.jpg", timeout: float = 60) -> requests.Response:
    """POST `data` as the field 'file' to a real server, as `curl -F file=@x.jpg` does."""
    return requests.post(base_url + "/file/", files={"file": (filename, data)}, timeout=timeout)
