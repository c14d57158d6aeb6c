"""/openapi.json describes the admin's routes only while admin is on: with no admin token they
answer 404, and the document must not advertise a surface that is not there."""
from __future__ import annotations


def test_the_admin_routes_are_in_the_document_only_while_admin_is_on(make_app, colour_model_path):
    admin_paths = ("/review", "/review/login", "/review/logout", "/api/uploads", "/api/models", "/api/models/rollback")
    off = make_app(MODEL_PATH=str(colour_model_path)).test_client().get("/openapi.json").get_json()["paths"]
    assert not [p for p in off if p in admin_paths or p.startswith(("/api/", "/review"))], list(off)
    assert "/file/" in off and "/uploads/{upload_id}/heatmap.png" in off
    on = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN="contract-admin-token-0123456789"
                  ).test_client().get("/openapi.json").get_json()["paths"]
    assert set(admin_paths) <= set(on)
