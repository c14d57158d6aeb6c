"""request_cost: the CPU of one upload, stage by stage, in process."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from images import BLUE, RED, image_bytes
from keras_serve.tools.benchmark.request_cost import STAGES, measure, render


def cost_config(model_path, tmp_path) -> dict:
    return {"MODEL_PATH": str(model_path), "UPLOAD_DIR": str(tmp_path / "uploads"), "WORKERS": 2,
            "BATCHING": "off", "LOG_FORMAT": "json"}


def test_every_stage_is_measured_and_the_whole_app_really_answers_and_stores(colour_model_path, tmp_path):
    from keras_serve.storage.records import RecordStore, sqlite_url

    config = cost_config(colour_model_path, tmp_path)
    results = measure([image_bytes(RED), image_bytes(BLUE)], n=3, rounds=2, config=config)
    assert list(results) == list(STAGES)
    assert all(len(values) == 2 and all(value > 0 for value in values) for values in results.values())
    # 20 warm-up calls and 2 rounds of 3, for each of the two stages that store an upload.
    records = RecordStore(sqlite_url(tmp_path / "uploads"))
    with records.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM uploads")).scalar() == 2 * (20 + 2 * 3)
        # Both stages store each upload with its answer, as the app does (red: DOG, blue: CAT).
        # Calls take the photos in turn from 0: per stage 10 of each to warm up, then red,
        # blue, red in each of the 2 rounds.
        labels = conn.execute(sa.text("SELECT predicted_label, count(*) FROM uploads GROUP BY 1")).all()
        assert sorted(labels) == [("CAT", 2 * (10 + 2)), ("DOG", 2 * (10 + 4))]
    records.close()


def test_an_upload_the_app_refuses_stops_the_measurement(colour_model_path, tmp_path):
    config = {**cost_config(colour_model_path, tmp_path), "MAX_CONTENT_LENGTH": 100}  # every body is over it
    with pytest.raises(RuntimeError, match="answered 413"):
        measure([image_bytes(RED)], n=1, rounds=1, config=config)


def test_the_rest_is_the_whole_app_less_the_stages_timed_alone():
    table = render({"decode": [1.0, 1.2, 1.1], "forward": [3.0, 2.0, 2.5], "store": [0.5, 0.5, 0.5],
                    "whole app": [6.0, 5.0, 5.5]})
    assert "| whole app | 5.50 | 5.00-6.00 | 100% |" in table
    assert "| forward | 2.50 | 2.00-3.00 | 45% |" in table
    assert "| the rest | 1.40 |  | 25% |" in table
