# One command each: `make serve` starts the server with the default model, `make test` runs
# every test. Both create .venv and install requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
ARGS ?=

.PHONY: serve test bench train evaluate

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/python app.py $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/python -m keras_serve.tools.benchmark $(ARGS)

train: $(VENV)/.installed
	$(VENV)/bin/python -m keras_serve.training.train --data ../shared/data/cats_vs_dogs --arch resnet --seed 3 --out models/cats_vs_dogs.h5 --labels CAT,DOG $(ARGS)

evaluate: $(VENV)/.installed
	$(VENV)/bin/python -m keras_serve.training.evaluate models/cats_vs_dogs.h5 --data ../shared/data/cats_vs_dogs --split validation $(ARGS)
