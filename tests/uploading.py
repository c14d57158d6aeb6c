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


def multipart_files_body(files: list[tuple[str, bytes]], boundary: str, field_name: str = "file") -> bytes:
    """A multipart/form-data body with one part per (filename, data), all in `field_name`
    (what a browser sends for <input type=file multiple>)."""
    body = b""
    for filename, data in files:
        body += (f"--{boundary}\r\n"
                 f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode("utf-8") + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode("ascii")


def post_files(client, files: list[tuple[str, bytes]], headers: dict | None = None, path: str = "/file/"):
    """POST several files, each a part named 'file', through a Flask test client."""
    boundary = fresh_boundary()
    return client.post(path, data=multipart_files_body(files, boundary), headers=headers or {},
                       content_type=f"multipart/form-data; boundary={boundary}")
