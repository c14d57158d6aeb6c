"""Posting uploads as real clients encode them (RFC 7578), for every test that sends a file."""
from __future__ import annotations

import secrets


def fresh_boundary() -> str:
    """A new multipart boundary in curl's style; real clients send a new one per upload."""
    return "------------------------" + secrets.token_hex(8)


def multipart_body(field_name: str, filename: str, content_type: str, data: bytes, boundary: str) -> bytes:
    """A multipart/form-data body holding one file field (what a browser form sends)."""
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode("ascii")
    return head + data + f"\r\n--{boundary}--\r\n".encode("ascii")


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
