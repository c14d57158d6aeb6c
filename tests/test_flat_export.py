"""`python -m keras_serve.storage export --format flat-csv`: a column per fact, the latest review included."""
from __future__ import annotations

import csv

from images import BLUE, RED, image_bytes
from uploading import post_file
from keras_serve.storage.flat_export import FLAT_FIELDS, spreadsheet_safe
from keras_serve.storage.__main__ import main


def test_flat_csv_has_prediction_confidence_unsure_model_version_and_latest_review(make_app, colour_model_path,
                                                                                  tmp_path, capsys):
    app = make_app(MODEL_PATH=str(colour_model_path))
    client = app.test_client()
    red = post_file(client, image_bytes(RED), "red.jpg").get_json()
    blue = post_file(client, image_bytes(BLUE), "=HYPERLINK(\"http://x\").jpg").get_json()
    unreviewed = post_file(client, image_bytes(RED), "later.jpg").get_json()
    reviews = app.extensions["review_store"]
    reviews.review([(red["id"], "CAT")], "ann")          # corrected ...
    reviews.review([(red["id"], "neither")], "bob")      # ... and corrected again: the latest counts
    reviews.review([(blue["id"], None)], "ann")          # confirmed: the prediction's label

    out = tmp_path / "table.csv"
    assert main(["--upload-dir", app.config["UPLOAD_DIR"], "export", "--format", "flat-csv", "--out", str(out)]) == 0
    assert "exported 3 uploads" in capsys.readouterr().err
    with open(out, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == FLAT_FIELDS
        rows = {row["id"]: row for row in reader}

    first = rows[red["id"]]
    assert (first["prediction"], first["confidence"], first["unsure"]) == (
        "DOG", f"{red['confidence']:.6f}", str(red["unsure"]).lower())
    assert first["model_version"] == red["model_version"] and len(first["model_version"]) == 64
    assert (first["review_label"], first["review_state"]) == ("neither", "corrected") and first["reviewed_at"]
    assert first["client_filename"] == "red.jpg" and first["format"] == "JPEG" and first["error"] == ""

    second = rows[blue["id"]]
    assert (second["prediction"], second["review_label"], second["review_state"]) == ("CAT", "CAT", "confirmed")
    assert second["client_filename"].startswith("'=HYPERLINK")  # no spreadsheet runs it as a formula

    third = rows[unreviewed["id"]]
    assert (third["review_label"], third["review_state"], third["reviewed_at"]) == ("", "", "")


def test_spreadsheet_safe():
    assert [spreadsheet_safe(t) for t in ("cat.jpg", "=1+1", "+1", "-1", "@SUM(A1)", "\tx", None, "")] == [
        "cat.jpg", "'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "", ""]
