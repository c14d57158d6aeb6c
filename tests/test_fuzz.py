"""The fuzz generator (keras_serve.tools.fuzz) against `python app.py` over real HTTP.

A longer run of the same cases: `python -m keras_serve.tools.fuzz --url URL --count 100000`.
"""
from collections import Counter

from server_process import ServerProcess
from keras_serve.tools import fuzz

COUNT = 2000


def test_cases_are_reproducible_from_seed_and_index():
    assert fuzz.case(7, 123) == fuzz.case(7, 123)
    assert fuzz.case(7, 123).data != fuzz.case(8, 123).data


def test_two_thousand_hostile_images_get_only_documented_statuses_and_the_server_lives(
        colour_model_path, tmp_path):
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path)) as server:
        outcomes = fuzz.send(server.url, fuzz.cases(seed=2026, count=COUNT), concurrency=4)
        assert fuzz.alive(server.url)
    assert len(outcomes) == COUNT
    unexpected = [(o.case.index, o.case.description, o.status, o.detail) for o in outcomes
                  if o.status not in fuzz.DOCUMENTED_STATUSES]
    assert not unexpected, unexpected[:10]
    by_kind = {kind: Counter(o.status for o in outcomes if o.case.kind == kind) for kind, _ in fuzz.KINDS}
    # Every kind was exercised, and the cases whose answer is known got it.
    assert all(sum(counter.values()) >= 20 for counter in by_kind.values()), by_kind
    assert set(by_kind["valid"]) == {200} and set(by_kind["exif"]) == {200}, by_kind
    assert set(by_kind["refused"]) == {415}, by_kind
    assert {413, 422, 415} <= set(by_kind["header"]) | set(by_kind["bomb"]) | set(by_kind["truncate"]), by_kind
