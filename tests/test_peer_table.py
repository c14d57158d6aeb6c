"""The side-by-side table of the peer benchmark: medians over repeats and the ratios (no timings)."""
from __future__ import annotations

import math

import pytest

from keras_serve.tools.benchmark import peers


def level(c: int, req_s: float, p99: float = 10.0, cpu: float = 3.0, errors: int = 0) -> dict:
    return {"c": c, "req_s": req_s, "p99_ms": p99, "cpu_ms_per_req": cpu + 1, "server_cpu_ms_per_req": cpu,
            "errors_total": errors}


RUNS = {
    "ours": [[level(1, 300), level(32, 600, p99=50)], [level(1, 320), level(32, 640, p99=70, errors=1)],
             [level(1, 310), level(32, 620, p99=60)]],
    "fastapi": [[level(1, 316), level(32, 590, p99=80)]],
    "bento": [[level(1, 203), level(32, 450, p99=90)]],
}


def test_medians_take_the_middle_repeat_per_level_and_add_up_errors():
    table = peers.medians(RUNS)
    assert table["ours"][1]["req_s"] == 310 and table["ours"][32]["req_s"] == 620
    assert table["ours"][32]["p99_ms"] == 60
    assert table["ours"][32]["errors"] == 1 and table["ours"][1]["errors"] == 0
    assert table["fastapi"][32]["req_s"] == 590


def test_best_peer_is_chosen_per_level():
    table = peers.medians(RUNS)
    assert peers.best_peer(table, ["fastapi", "bento"], 1) == "fastapi"
    assert peers.best_peer(table, ["bento"], 32) == "bento"
    assert peers.best_peer(table, [], 32) is None


def test_ratio_rows_compare_to_the_best_other_peer_the_baseline_and_the_limit():
    table = peers.medians(RUNS)
    rows = {row[0]: row for row in peers.ratio_rows(table, ["fastapi", "bento"], [1, 32], "fastapi", 700.0)}
    headers = peers.ratio_headers([1, 32], "fastapi")
    ours = dict(zip(headers, rows["ours"]))
    assert ours["c=1"] == 310 and ours["c=32"] == 620 and ours["p99 ms c=32"] == 60
    assert ours["errors"] == 1 and ours["server CPU ms/req c=32"] == 3.0
    # the weakest level decides: 310/316 at c=1 is below 620/590 at c=32
    assert ours["min x best other peer"] == pytest.approx(310 / 316)
    assert ours["x fastapi c=1"] == pytest.approx(310 / 316) and ours["x fastapi c=32"] == pytest.approx(620 / 590)
    assert ours["x pipeline c=32"] == pytest.approx(620 / 700)
    # a peer is compared with the other peers, never with itself
    fastapi = dict(zip(headers, rows["fastapi"]))
    assert fastapi["min x best other peer"] == pytest.approx(min(316 / 203, 590 / 450))
    assert fastapi["x fastapi c=32"] == 1.0


def test_missing_numbers_are_nan_not_errors():
    table = peers.medians({"ours": [[level(1, 100)]]})
    row = peers.ratio_rows(table, ["fastapi"], [1, 32], None, None)[0]
    assert row[1] == 100 and math.isnan(row[2]) and math.isnan(row[-1]) and math.isnan(row[-4])
    assert "-" in peers.render(table, {"ours": "this server"}, ["fastapi"], [1, 32], None, None)


def test_our_system_takes_its_environment_and_promotes_a_file_before_it_starts(tmp_path):
    system = peers.our_system("int8", ["KERAS_SERVE_THREADS=8", "--workers", "2", "--promote",
                                       "models/cats_vs_dogs.int8.onnx"], 18000, tmp_path)
    assert system.env == {"KERAS_SERVE_THREADS": "8"}
    assert "--promote" not in system.command and system.command[-2:] == ["--workers", "2"]
    assert system.command[system.command.index("--upload-dir") + 1] == str(tmp_path)
    assert system.prepare[-2:] == [str(tmp_path), str(peers.PROJECT_ROOT / "models/cats_vs_dogs.int8.onnx")]
    assert peers.our_system("float", ["--workers", "2"], 18000, tmp_path).prepare is None
    with pytest.raises(ValueError, match="needs a model file"):
        peers.our_system("broken", ["--promote"], 18000, tmp_path)
