# keras-serve with the default model baked in. From the repository root:
#   docker build -t keras-serve .
#   docker run --rm -p 8080:8080 keras-serve
# Another model: mount its folder and point KERAS_SERVE_MODEL_PATH at the file (a model card
# beside it, my.json for my.h5, is read too):
#   docker run --rm -p 8080:8080 -v "$PWD/my-models:/models:ro" \
#     -e KERAS_SERVE_MODEL_PATH=/models/my.h5 -e KERAS_SERVE_LABELS=cat,dog,fox keras-serve
# Every setting is a KERAS_SERVE_* variable (docs/reference.md, Options). deploy/compose.yaml runs it
# with PostgreSQL and an S3 store; deploy/k8s/ holds Kubernetes manifests.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    HOME=/tmp \
    KERAS_HOME=/tmp/keras

# A fixed numeric id, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 keras-serve \
 && useradd --system --uid 10001 --gid keras-serve --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin keras-serve

WORKDIR /app

# Only the runtime pins, as `make serve` installs them: test tools (requirements-test.txt) stay
# out of the image. tf-keras goes in without its dependencies, which would add the GPU build of
# TensorFlow beside tensorflow-cpu. This layer is rebuilt only when these files change.
COPY requirements.txt requirements-no-deps.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-no-deps.txt

COPY pyproject.toml app.py ./
COPY keras_serve/ keras_serve/
COPY templates/ templates/
COPY static/ static/
COPY models/ models/
# Editable, as `make` does, so the package finds templates/, static/ and models/ beside it.
RUN pip install --no-cache-dir --no-deps -e . \
 && mkdir -p /var/lib/keras-serve/uploads \
 && chown -R keras-serve:keras-serve /var/lib/keras-serve
# Convert the default model for the fastest engine now: the conversion is cached in
# models/.cache (keras_serve/model/engines.py), which is read-only at run time.
RUN python -c "from keras_serve.model.served_model import ServedModel; print(ServedModel.load('models/cats_vs_dogs.h5').summary_line())"

ENV KERAS_SERVE_HOST=0.0.0.0 \
    KERAS_SERVE_PORT=8080 \
    KERAS_SERVE_MODEL_PATH=/app/models/cats_vs_dogs.h5 \
    KERAS_SERVE_UPLOAD_DIR=/var/lib/keras-serve/uploads
VOLUME ["/var/lib/keras-serve"]

USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KERAS_SERVE_PORT', '8080'), timeout=4)"]
CMD ["keras-serve"]
