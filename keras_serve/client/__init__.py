"""A Python client for a keras-serve server, and `python -m keras_serve.client` for folders.

    from keras_serve.client import Client, ClientError

    client = Client("http://localhost:8080")          # token: KERAS_SERVE_API_TOKEN, or token=...
    answer = client.classify("cat.jpg")               # the server's JSON answer, a dict
    print(answer["label"], answer["confidence"], answer["unsure"])

A refused image raises ClientError with the server's status and error code (`not_an_image`,
`empty_image`, ...); 429 and 503 answers are tried again after their Retry-After (a few times).
One Client may be shared by threads: each thread gets its own connection.
"""
from __future__ import annotations

from keras_serve.client.http import TOKEN_ENV, Client, ClientError

__all__ = ["Client", "ClientError", "TOKEN_ENV"]
