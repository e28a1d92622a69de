# `make run`: install into .venv and run the main job on the built-in default.
# `make test`: install the dev dependencies and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test clean

install: $(STAMP)

# torch first, pinned to the CPU build that lies on local disk: an unpinned
# torch (pulled in by transformers/peft) would download a multi-GB CUDA build.
# A machine that already has a CUDA torch in the venv keeps it.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/memtune study seed --model tiny --out runs/study-seed

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
