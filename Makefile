# Two set-up-free entry points: `make bench` and `make test` bootstrap .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench test venv guests clean

$(STAMP): pyproject.toml scripts/build_unicorn.py third_party/unicorn/tlslab.patch
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@# Unicorn 2.1.4 with our patch (about 20 s, third_party/unicorn/README.md); without it tlslab
	@# runs the stock wheel's library, with the same results, more slowly
	$(PY) scripts/build_unicorn.py || echo "WARNING: tlslab's Unicorn was not built; using the stock library (slower)" >&2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m tlslab bench --report

guests:
	$(MAKE) -C guests

clean:
	rm -rf $(VENV) build *.egg-info
