# Everything a fresh machine needs: `make demo` and `make test` create .venv/ and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned here: an unpinned `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/sr-batch demo

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out
