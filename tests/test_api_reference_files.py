"""/docs and the Swagger UI files it loads, served by the app itself (no CDN), in process."""
import re


def test_the_page_loads_only_files_of_this_server(client):
    answer = client.get("/docs")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    page = answer.get_data(as_text=True)
    assert "<script>" not in page and not re.search(r"<[^>]*\son[a-z]+\s*=", page)  # no inline script or handler
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(src.startswith("/") and not src.startswith("//") for src in sources), sources
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/static/api-reference.js"} <= set(sources)
    for src in sources:
        assert client.get(src).status_code == 200, src
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy and "unsafe" not in policy


def test_swagger_ui_files_are_served_and_nothing_else(client):
    from keras_serve.web.api_reference import swagger_ui_version

    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and script.mimetype == "text/javascript" and b"SwaggerUIBundle" in script.data
    assert "max-age=" in script.headers["Cache-Control"]
    assert client.get("/docs/assets/swagger-ui.css").mimetype == "text/css"
    assert swagger_ui_version().startswith("5.")
    for name in ("index.css", "oauth2-redirect.html", "..%2F__init__.py", "LICENSE", "x"):
        answer = client.get(f"/docs/assets/{name}")
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "not_found", name
