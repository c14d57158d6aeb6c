# `make serve` starts the server with the default model, `make check` runs the fast tests (unit and
# in-process HTTP, about a minute), `make test` runs every test on $(TEST_WORKERS) workers.
# Each creates .venv on first use: serve installs the runtime (requirements.txt), check and test
# add the test tools and engines (requirements-test.txt).
PYTHON ?= python3
VENV := .venv
ARGS ?=
TEST_WORKERS ?= 2
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test
# What `make check` leaves out; tests/suite_kinds.py marks them.
SLOW := engines or processes or browser or training or photos

.PHONY: serve test check bench train evaluate

# Compiled bytecode (and pytest's rewritten test modules) are kept between runs, even where the
# environment says not to: without them every test process compiles again, about 3 s of CPU each.
unexport PYTHONDONTWRITEBYTECODE

# A venv made before requirements.txt named tensorflow-cpu holds tensorflow (the same module
# with GPU kernels): it is uninstalled first, or both would own the same files.
$(RUNTIME): requirements.txt requirements-no-deps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	if $(VENV)/bin/pip show --quiet tensorflow >/dev/null 2>&1; then $(VENV)/bin/pip uninstall --quiet --yes tensorflow; fi
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-no-deps.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

$(TESTING): $(RUNTIME) requirements-test.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

serve: $(RUNTIME)
	$(VENV)/bin/python app.py $(ARGS)

# A file per worker at a time (module fixtures start once), costliest files first (suite_kinds.py).
test: $(TESTING)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

check: $(TESTING)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist load -m "not ($(SLOW))" $(ARGS)

bench: $(RUNTIME)
	$(VENV)/bin/python -m keras_serve.tools.benchmark $(ARGS)

train: $(RUNTIME)
	$(VENV)/bin/python -m keras_serve.training.train --data ../shared/data/cats_vs_dogs --arch resnet --seed 3 --out models/cats_vs_dogs.h5 --labels CAT,DOG $(ARGS)

evaluate: $(RUNTIME)
	$(VENV)/bin/python -m keras_serve.training.evaluate models/cats_vs_dogs.h5 --data ../shared/data/cats_vs_dogs --split validation $(ARGS)
