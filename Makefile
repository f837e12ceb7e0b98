# The two commands README.md opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# ---------------------------------------------------------------------------
# Python set-up: a local venv with the pinned requirements (torch==2.13.0, CPU build).

$(SETUP_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(SETUP_STAMP)

# ---------------------------------------------------------------------------
# The main job end to end on the default data (../shared/tinystories).

demo: setup
	$(PY) tinystories.py download
	$(PY) tinystories.py train_vocab --vocab_size=512
	$(PY) tinystories.py pretokenize --vocab_size=512
	$(PY) tokenizer.py --tokenizer-model=data/tok512.model

test: setup
	$(PY) -m pytest -q tests

# ---------------------------------------------------------------------------
# C engine (run.c + csrc/)

clean:
	rm -rf __pycache__ tests/__pycache__
