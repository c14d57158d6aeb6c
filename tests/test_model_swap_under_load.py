"""A promotion while 32 clients upload: no request fails, every process switches during the run,
and every answer comes whole from one model (the version it names is the model that answered).

One process, `--workers 2`, and two replicas sharing PostgreSQL and S3. The colour model
answers DOG for red, the inverted one CAT, so a mixed-up answer cannot pass. The latency
during the swap is measured by `tests/measure_model_swap.py` (a benchmark,
not a test).
"""
from __future__ import annotations

import hashlib
import secrets

import pytest
import requests

from images import BLUE, RED, image_bytes
from server_process import ServerProcess

CLIENTS = 32
EXPECTED = {"old": {"red": "DOG", "blue": "CAT"}, "new": {"red": "CAT", "blue": "DOG"}}


def promote_during_load(urls, store_args, new_model, env_vars, monkeypatch):
    from keras_serve.model.__main__ import main as model_cli
    from measure_model_swap import drive

    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    images = [image_bytes(RED, fmt="PNG"), image_bytes(BLUE, fmt="PNG")]
    run = drive(urls, images, CLIENTS, before_s=3.0, after_s=10.0,
                promote=lambda: model_cli([*store_args, "promote", str(new_model)]) == 0 or pytest.fail("promote"))
    return run, images


def check(run, old_sha: str, new_sha: str) -> None:
    assert run.answers and not run.failures, [(a.status, a.seconds) for a in run.failures[:5]]
    names = {old_sha: "old", new_sha: "new"}
    colours = ("red", "blue")  # the images drive() sends, by index
    for answer in run.answers:
        # the version an answer names is the model that computed it: red is DOG for the old one, CAT for the new
        assert answer.label == EXPECTED[names[answer.version]][colours[answer.image]], answer
    # no answer from the new model arrived before its promotion began; after the last request the
    # old one answered, more than a round of every client was answered by the new one: each
    # process switched and stayed there within the run (how many seconds that takes is
    # measure_model_swap.py's figure, a benchmark)
    assert all(a.sent + a.seconds >= run.promoted_at for a in run.answers if a.version == new_sha)
    switched = run.switched_at(new_sha)
    assert switched is not None, "no process ever answered with the new model"
    assert sum(a.version == new_sha for a in run.answers if a.sent > switched) > CLIENTS  # and stayed there


def models_served(url: str, attempts: int = 60) -> dict[int, str]:
    """pid -> the sha256 it serves, over fresh connections (spread over the workers)."""
    seen: dict[int, str] = {}
    for _ in range(attempts):
        model = requests.get(url + "/model", headers={"Connection": "close"}, timeout=10).json()
        seen[model["versions"]["pid"]] = model["sha256"]
    return seen


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_swap_under_load_fails_no_request(workers, colour_model_path, inverted_colour_model_path, tmp_path,
                                            monkeypatch):
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), "--workers", workers,
                       "--threads", "16", "--model-check-interval", "0.5") as server:
        run, _ = promote_during_load(
            [server.url], ["--upload-dir", str(tmp_path), "--model", str(colour_model_path)],
            inverted_colour_model_path, {}, monkeypatch)
        check(run, sha(colour_model_path), sha(inverted_colour_model_path))
        served = models_served(server.url)
        assert set(served.values()) == {sha(inverted_colour_model_path)}
        if workers == "2":
            assert len(served) == 2  # both workers answered /model, both with the new version
        assert "model swapped" in server.output_once_it_says("model swapped")


def test_two_replicas_on_one_database_both_swap(colour_model_path, inverted_colour_model_path, tmp_path,
                                                postgres, seaweedfs, monkeypatch):
    database_url = postgres.create_database()
    store = ["--database-url", database_url, "--image-store", f"s3://{seaweedfs.bucket}/swap-{secrets.token_hex(4)}"]
    env = seaweedfs.env()
    replicas = [ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path / name), *store,
                              "--threads", "16", "--model-check-interval", "0.5", env=env) for name in ("a", "b")]
    try:
        run, _ = promote_during_load(
            [r.url for r in replicas], [*store, "--model", str(colour_model_path)], inverted_colour_model_path,
            env, monkeypatch)
        check(run, sha(colour_model_path), sha(inverted_colour_model_path))
        for replica in replicas:  # each fetched the file from the shared S3 store, not a local path
            assert set(models_served(replica.url, 3).values()) == {sha(inverted_colour_model_path)}
    finally:
        for replica in replicas:
            replica.stop()
        postgres.drop_database(database_url)
