"""The benchmark's floor server: the real server with the forward pass, or all of classify, canned."""
from __future__ import annotations

import pytest
import requests

from images import BLUE, RED, image_bytes
from server_process import ServerProcess
from uploading import post_over_http

FLOOR_SERVER = "keras_serve/tools/benchmark/floor_server.py"


@pytest.fixture()
def floor_server(colour_model_path, tmp_path):
    def start(stub: str) -> ServerProcess:
        return ServerProcess("--stub", stub, "--model", str(colour_model_path), "--upload-dir", str(tmp_path),
                             script=FLOOR_SERVER)
    return start


def test_stub_model_decodes_and_stores_but_answers_without_the_model(floor_server):
    with floor_server("model") as server:
        red, blue = (post_over_http(server.url, image_bytes(colour)) for colour in (RED, BLUE))
        assert red.status_code == blue.status_code == 200
        # The tiny model tells red from blue; the canned forward pass cannot.
        assert red.json()["class"] == blue.json()["class"]
        stored = requests.get(server.url + red.json()["image_url"], timeout=10)
        assert stored.status_code == 200 and stored.content == image_bytes(RED)
        assert post_over_http(server.url, b"not an image").status_code == 415  # decoding still runs


def test_stub_pipeline_answers_without_decoding_or_storing(floor_server):
    with floor_server("pipeline") as server:
        answer = post_over_http(server.url, b"not an image")
        assert answer.status_code == 200 and "class" in answer.json()
        assert requests.get(server.url + answer.json()["image_url"], timeout=10).status_code == 404


def test_floor_server_refuses_workers(colour_model_path, tmp_path):
    with pytest.raises(RuntimeError, match="one process"):
        ServerProcess("--stub", "model", "--workers", "2", "--model", str(colour_model_path),
                      "--upload-dir", str(tmp_path), script=FLOOR_SERVER, startup_timeout=60)
