# The front door. `make demo` and `make test` set everything up on a fresh machine
# (Python 3.11 + a Rust toolchain): a virtualenv in .venv, the dev dependencies, the extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MATURIN := $(VENV)/bin/maturin
STAMP := $(VENV)/.deps-installed

.PHONY: install build build-release wheel demo test test-rust test-python lint-python lint-rust \
	rustfmt-check clippy bench lint typecheck fmt clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "maturin>=1.5,<2"
	rm -f $(STALE_EXT)
	$(MATURIN) develop --extras dev
	touch $(STAMP)

install: $(STAMP)

# An extension built before it was abi3 (`_core.cpython-3XX-*.so`) would shadow `_core.abi3.so`
# on import and be packed into wheels: removed before every build.
STALE_EXT := python/chengeta_ai/_core.cpython-*.so

## build: the extension in place, dev profile (incremental)
build: $(STAMP)
	rm -f $(STALE_EXT)
	$(MATURIN) develop --skip-install

## build-release: optimised extension, for benchmarks
build-release: $(STAMP)
	rm -f $(STALE_EXT)
	$(MATURIN) develop --skip-install --release

## wheel: the abi3 wheel (one per platform, CPython 3.10+), release profile, into dist/
wheel: $(STAMP)
	rm -f $(STALE_EXT)
	$(MATURIN) build --release --out dist --interpreter $(PY)

demo: build
	$(PY) -m chengeta_ai demo

test-rust:
	cargo test --no-default-features

test-python: build
	bash scripts/ensure_redis.sh
	$(PY) -m pytest tests -q
	$(PY) -m pytest benches -q --benchmark-disable

## test: every linter (ruff, mypy + stubtest, cargo fmt, clippy), then the Rust unit tests, the
## Python suite and every benchmark once in smoke mode (so the suite's closing line is last)
test: lint-python typecheck lint-rust test-rust test-python

lint-python: $(STAMP)
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

## bench: the benchmarks for real, on a release build; prints the ratios
bench: build-release
	bash scripts/ensure_redis.sh
	$(PY) -m pytest benches -q -s --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

lint: lint-python lint-rust

## lint-rust: cargo fmt --check; clippy -D warnings with and without the `python` feature.
## A missing rustfmt/clippy is added with rustup; when it cannot be had, a loud banner says
## the check is skipped (scripts/ensure_rust_tools.sh).
lint-rust: rustfmt-check clippy

rustfmt-check:
	@sh scripts/ensure_rust_tools.sh rustfmt; rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "cargo fmt --check"; cargo fmt --check

# The bindings are checked against the venv's interpreter, the one maturin builds for.
clippy: $(STAMP)
	@sh scripts/ensure_rust_tools.sh clippy; rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	set -x; \
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --all-targets -- -D warnings && \
	cargo clippy --all-targets --no-default-features -- -D warnings

typecheck: build
	$(VENV)/bin/mypy python/chengeta_ai
	$(PY) -m mypy.stubtest chengeta_ai._core

fmt: $(STAMP)
	$(VENV)/bin/ruff format python tests benches
	cargo fmt

clean:
	rm -rf $(VENV) target python/chengeta_ai/*.so
