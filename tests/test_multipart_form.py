"""multipart_form parses what Werkzeug's own parser parses, the same way, within the same limits."""
import io

import pytest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from keras_serve.errors import TooManyFormPartsError
from keras_serve.web.multipart_form import MultipartFormDataParser


def body(boundary: str, *parts: bytes) -> bytes:
    return b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def file_part(name: str, filename: str, data: bytes, content_type: str = "image/jpeg") -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode("utf-8") + data


def field_part(name: str, value: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()


BOUNDARY = "------------------------a1b2c3d4e5f6a7b8"
TRICKY = b"\r\n--" + BOUNDARY[:-1].encode() + b"\r\n\xff\xd8\x00 almost a boundary \r\n--"
CASES = {
    "one file": body(BOUNDARY, file_part("file", "cat.jpg", b"\xff\xd8jpeg")),
    "boundary-like bytes inside": body(BOUNDARY, file_part("file", "cat.jpg", TRICKY * 50)),
    "large file": body(BOUNDARY, file_part("file", "big.jpg", bytes(range(256)) * 8000)),
    "fields and two files": body(BOUNDARY, field_part("note", "héllo wörld"), file_part("file", "a.png", b"A"),
                                 file_part("other", "b.gif", b"B", "image/gif"), field_part("note", "second")),
    "unicode file name": body(BOUNDARY, file_part("file", "chat noir 🐈.jpg", b"x")),
    "path in file name": body(BOUNDARY, file_part("file", "../../etc/passwd", b"x")),
    "empty file": body(BOUNDARY, file_part("file", "empty.jpg", b"")),
    "no parts": f"--{BOUNDARY}--\r\n".encode(),
}
MALFORMED = {
    "wrong boundary": body("someotherboundary", file_part("file", "cat.jpg", b"x")),
    "garbage": b"this is not multipart at all",
    "truncated": body(BOUNDARY, file_part("file", "cat.jpg", b"x" * 1000))[:500],
}


def parse(parser_class, data: bytes, boundary: str = BOUNDARY, **limits):
    parser = parser_class(**limits)
    _, form, files = parser.parse(io.BytesIO(data), "multipart/form-data", len(data), {"boundary": boundary})
    return ({k: form.getlist(k) for k in form},
            {k: [(f.filename, f.content_type, f.read()) for f in files.getlist(k)] for k in files})


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_result_as_werkzeug(case):
    ours = parse(MultipartFormDataParser, CASES[case])
    assert ours == parse(FormDataParser, CASES[case])
    if case != "no parts":
        assert ours != ({}, {})  # the comparison is not between two empty results


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bodies_parse_to_nothing_like_werkzeug(case):
    assert parse(MultipartFormDataParser, MALFORMED[case])[1] == parse(FormDataParser, MALFORMED[case])[1] == {}


def test_missing_boundary_parses_to_nothing():
    assert parse(MultipartFormDataParser, CASES["one file"], boundary="") == ({}, {})


def test_part_count_and_field_size_limits_apply():
    many = body(BOUNDARY, *[field_part(f"f{i}", "v") for i in range(20)])
    with pytest.raises(TooManyFormPartsError, match="more than 10 parts"):  # not "too large": it may be tiny
        parse(MultipartFormDataParser, many, max_form_parts=10)
    assert len(parse(MultipartFormDataParser, many, max_form_parts=20)[0]) == 20
    with pytest.raises(RequestEntityTooLarge):
        parse(MultipartFormDataParser, body(BOUNDARY, field_part("note", "x" * 100)), max_form_memory_size=50)
    # the memory limit is for text fields; a file part of any size within the body limit is fine
    assert parse(MultipartFormDataParser, CASES["large file"], max_form_memory_size=50)[1]["file"][0][0] == "big.jpg"


def test_the_app_uses_it(app):
    from flask import request

    with app.test_request_context("/file/", method="POST", data=CASES["one file"],
                                  content_type=f"multipart/form-data; boundary={BOUNDARY}"):
        assert request.form_data_parser_class is MultipartFormDataParser
        assert request.files["file"].read() == b"\xff\xd8jpeg"
