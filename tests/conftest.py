"""Shared fixtures: tiny models the tests build themselves, apps configured around them."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Every server a test starts (ServerProcess, `subprocess.run(["app.py", ...])`, gunicorn) is one
# process unless the test says --workers N: the tests count in memory, drain on SIGTERM and read
# /metrics as one process does. Tests of `--workers auto` unset it (tests/test_workers.py).
os.environ["KERAS_SERVE_WORKERS"] = "1"
ROOT = Path(__file__).resolve().parent.parent

import numpy as np
import pytest

SHARED_DATA = ROOT.parent / "shared" / "data" / "cats_vs_dogs"
DEFAULT_MODEL = ROOT / "models" / "cats_vs_dogs.h5"


# CI (.ci/run) sets REFUSE_SKIPS=1: then any skipped test fails the run (tests/refuse_skips.py).
# suite_kinds marks each test with what it starts (engines, processes, browser, training) for
# `make check`, and orders the files for `make test`'s workers.
pytest_plugins = ["refuse_skips", "suite_kinds"]


def build_colour_model(size: int = 32, channels: int = 3, units: int = 1):
    """A model whose answer is known: sigmoid(10 * (mean red - mean blue)).

    Red images score near 1 (the second label, DOG), blue near 0 (CAT). With units=3 it is
    a softmax over (red, green, blue) means, so the brightest channel wins.
    """
    import keras

    inputs = keras.Input((size, size, channels))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(x)
    model = keras.Model(inputs, outputs, name="colour")
    if units == 1:
        kernel = np.zeros((channels, 1), np.float32)
        kernel[0, 0], kernel[-1, 0] = 10.0, -10.0
    else:
        kernel = np.eye(channels, units, dtype=np.float32) * 20.0
    model.layers[-1].set_weights([kernel, np.zeros(units, np.float32)])
    return model


@pytest.fixture(scope="session")
def colour_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "colour.h5"
    build_colour_model().save(path)
    return path


@pytest.fixture(scope="session")
def inverted_colour_model_path(tmp_path_factory) -> Path:
    """The colour model the other way round: red images score near 0 (CAT), blue near 1 (DOG)."""
    path = tmp_path_factory.mktemp("models") / "inverted.h5"
    model = build_colour_model()
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([-kernel, bias])
    model.save(path)
    return path


# Model files read by Keras in this session, by file identity and load options: the suite creates
# some 200 apps on a handful of tiny model files, and reading one again costs ~50 ms for nothing.
_LOADED_MODELS: dict[tuple, object] = {}


def _cached_model_loader(load):
    """`keras_formats.load_keras_model` that reads each unchanged file once (a changed or replaced
    file has another size, mtime or inode: it is read again). Failures are not cached."""
    def cached(path, arch=None, max_weight_bytes=None, trust_model_code=False):
        try:
            st = Path(path).resolve().stat()
        except OSError:
            return load(path, arch=arch, max_weight_bytes=max_weight_bytes, trust_model_code=trust_model_code)
        key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, arch, max_weight_bytes,
               trust_model_code)
        if key not in _LOADED_MODELS:
            if len(_LOADED_MODELS) >= 32:
                _LOADED_MODELS.pop(next(iter(_LOADED_MODELS)))
            _LOADED_MODELS[key] = load(path, arch=arch, max_weight_bytes=max_weight_bytes,
                                       trust_model_code=trust_model_code)
        return _LOADED_MODELS[key]
    return cached


@pytest.fixture()
def make_app(tmp_path, monkeypatch):
    """create_app with a private upload folder; every app made is closed after the test.

    The apps share Keras models read from unchanged files (_cached_model_loader); what is built
    from a model (its engine, its checks) is still made per app.
    """
    from keras_serve import create_app
    from keras_serve.model import keras_formats

    monkeypatch.setattr(keras_formats, "load_keras_model", _cached_model_loader(keras_formats.load_keras_model))
    apps = []

    def make(**config):
        app = create_app({"UPLOAD_DIR": str(tmp_path / "uploads"), "TESTING": True, **config})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["classifier"].close()


@pytest.fixture()
def app(make_app, colour_model_path):
    return make_app(MODEL_PATH=str(colour_model_path), MAX_CONTENT_LENGTH=2 * 1024 * 1024, MAX_PIXELS=4_000_000)


@pytest.fixture()
def client(app):
    return app.test_client()


# --- storage back ends: every storage test runs on each -------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the whole session (tests/services.py)."""
    from services import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def seaweedfs():
    """A real S3 server (SeaweedFS) for the whole session (tests/services.py)."""
    from services import running_seaweedfs

    with running_seaweedfs() as server:
        yield server


@pytest.fixture(scope="session")
def store_schema_database(postgres, tmp_path_factory) -> str:
    """The name of a PostgreSQL database that holds the upload store's schema and no uploads.

    Each postgresql+s3 store of a test is a copy (CREATE DATABASE ... TEMPLATE): a fresh store
    without running every migration again (about 0.2 s a test). Each copy gets its own store id,
    as a migration would make it.
    """
    from keras_serve.storage.uploads import UploadStore

    url = postgres.create_database()
    UploadStore.from_config({"UPLOAD_DIR": str(tmp_path_factory.mktemp("schema-uploads")),
                             "DATABASE_URL": url}).close()
    return url.rsplit("/", 1)[1]


def fresh_store_database(postgres, template: str) -> str:
    """A copy of `store_schema_database` with a store id of its own; its SQLAlchemy URL."""
    import secrets

    url = postgres.create_database(template=template)
    postgres.execute(url, "UPDATE store_identity SET store_id = %s", (secrets.token_hex(16),))
    return url


def _storage_config(kind, request, tmp_path, monkeypatch):
    config = {"UPLOAD_DIR": str(tmp_path / "uploads")}
    if kind == "sqlite+files":
        yield config
        return
    postgres, s3 = request.getfixturevalue("postgres"), request.getfixturevalue("seaweedfs")
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    database_url = fresh_store_database(postgres, request.getfixturevalue("store_schema_database"))
    config.update(DATABASE_URL=database_url, IMAGE_STORE=f"s3://{s3.bucket}/{tmp_path.name}")
    yield config
    postgres.drop_database(database_url)


@pytest.fixture(params=["sqlite+files", "postgresql+s3"])
def storage_config(request, tmp_path, monkeypatch):
    """Settings of a fresh, empty upload store on one back end: SQLite + files in a temp
    folder, or a new PostgreSQL database + a new prefix in the S3 bucket (AWS_* set here too).
    """
    yield from _storage_config(request.param, request, tmp_path, monkeypatch)


@pytest.fixture()
def local_storage_config(request, tmp_path, monkeypatch):
    """The SQLite + files back end only, for what only it has (a folder, a disk)."""
    yield from _storage_config("sqlite+files", request, tmp_path, monkeypatch)


@pytest.fixture()
def no_retention_thread(monkeypatch):
    """Apps made in this test start no background retention pass. For tests that change the
    store under a running app (its folder, its clock): the pass an app runs at start would race
    them, and the test calls `store.prune()` itself where it is about retention."""
    from keras_serve.storage.uploads import UploadStore

    monkeypatch.setattr(UploadStore, "start_maintenance", lambda self, interval_s=3600.0: None)


@pytest.fixture()
def remote_storage_config(request, tmp_path, monkeypatch):
    """The PostgreSQL + S3 back end only."""
    yield from _storage_config("postgresql+s3", request, tmp_path, monkeypatch)


@pytest.fixture()
def make_store(storage_config):
    """UploadStore.from_config on the test's back end; closed after the test."""
    from keras_serve.storage.uploads import UploadStore

    stores = []

    def make(**overrides):
        store = UploadStore.from_config({"UPLOAD_RETENTION_DAYS": 30, **storage_config, **overrides})
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture()
def store(make_store):
    return make_store()


@pytest.fixture(scope="module")
def server(colour_model_path, tmp_path_factory):
    """`python app.py` with the colour model and a 1 MB body limit, one per test module."""
    from server_process import ServerProcess

    uploads = tmp_path_factory.mktemp("uploads")
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(uploads),
                       "--max-upload-mb", "1") as srv:
        srv.uploads = uploads
        yield srv


@pytest.fixture()
def redis_server():
    """A fresh, empty redis-server (tests/services.py), for one test."""
    from services import running_redis

    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module (tests/chromium.py)."""
    from playwright.sync_api import sync_playwright

    from chromium import launch

    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()
