# Development entry points. Every target installs what it needs first (`deps`), so a
# fresh clone on a fresh Debian machine needs nothing but python3, make and root.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-stamp
IMAGE  ?= nvswitch-dp:dev
# Debian packages the tests drive: promtool and the Prometheus server (metrics tests);
# wrk loads the REST API in benchmarks/rest.py.
DEBIAN_PACKAGES := prometheus wrk

.PHONY: deps fmt lint test test-cover build image-build demo proto proto-check bench clean

deps: $(STAMP)

$(STAMP): pyproject.toml
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1; then \
		echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

fmt: deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

test-cover: lint
	$(BIN)/pytest --cov=nvswitch_dp --cov-report=term-missing --cov-report=xml

build: deps
	$(BIN)/pip wheel --no-deps -w dist .

image-build:
	@command -v docker >/dev/null 2>&1 || { echo "image-build needs docker or podman"; exit 1; }
	docker build -f Containerfile -t $(IMAGE) .

# DEMO=dra: the DRA-mode walk-through instead (nvswitch-dp demo --mode dra); DEMO=both:
# the device-plugin one, then the DRA one, each ending by itself (no Ctrl-C needed).
DEMO ?= device-plugin
demo: deps
ifeq ($(DEMO),both)
	$(BIN)/nvswitch-dp demo --no-wait
	$(BIN)/nvswitch-dp demo --mode dra --no-wait
else
	$(BIN)/nvswitch-dp demo --mode $(DEMO)
endif

proto: deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python tools/gen_proto.py

proto-check: deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python tools/gen_proto.py --check

bench: deps
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis
