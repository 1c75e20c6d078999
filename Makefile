# The front door. `make demo` and `make test` set everything up on a fresh machine
# (Python 3.11 + a Rust toolchain): a virtualenv in .venv, the dev dependencies, the extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MATURIN := $(VENV)/bin/maturin
STAMP := $(VENV)/.deps-installed

.PHONY: install build build-release demo test test-rust test-python lint-python bench lint typecheck fmt clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "maturin>=1.5,<2"
	$(MATURIN) develop --extras dev
	touch $(STAMP)

install: $(STAMP)

## build: the extension in place, dev profile (incremental)
build: $(STAMP)
	$(MATURIN) develop --skip-install

## build-release: optimised extension, for benchmarks
build-release: $(STAMP)
	$(MATURIN) develop --skip-install --release

demo: build
	$(PY) -m chengeta_ai demo

test-rust:
	cargo test --no-default-features

test-python: build
	bash scripts/ensure_redis.sh
	$(PY) -m pytest tests -q
	$(PY) -m pytest benches -q --benchmark-disable

## test: Rust unit tests, the Python suite, every benchmark once in smoke mode, ruff, mypy
test: lint-python typecheck test-rust test-python

lint-python: $(STAMP)
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

## bench: the benchmarks for real, on a release build; prints the ratios
bench: build-release
	bash scripts/ensure_redis.sh
	$(PY) -m pytest benches -q -s --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

lint: lint-python
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

typecheck: build
	$(VENV)/bin/mypy python/chengeta_ai
	$(PY) -m mypy.stubtest chengeta_ai._core

fmt: $(STAMP)
	$(VENV)/bin/ruff format python tests benches
	cargo fmt

clean:
	rm -rf $(VENV) target python/chengeta_ai/*.so
