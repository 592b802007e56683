# Development entry points. Every target installs what it needs first (`deps`), so a
# fresh clone on a fresh Debian machine needs nothing but python3, make and root.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-stamp
# The image is tagged with the project's version (pyproject.toml), the tag the manifests
# under deployments/ name (tests/test_packaging.py keeps them equal): bump both together.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE  ?= nvswitch-dp:$(VERSION)
# The metrics tests run promtool and a Prometheus server of their own (on a free port,
# tests/test_metrics.py). Both come from Debian's `prometheus` package, but installing
# that package also starts its service on a systemd host: a Prometheus server left
# listening on :9090, the daemon's own port. So the package is never installed: its two
# programs are taken out of the .deb (`apt-get download` + `dpkg-deb -x`, no maintainer
# script runs, no service exists) into $(BIN), where the tests look beside the
# interpreter. Both are Go programs that need only libc. One recipe, named by
# $(BIN)/promtool, extracts both.
# wrk loads the REST API in benchmarks/rest.py; its package has no service.
DEBIAN_PACKAGES := wrk

.PHONY: deps fmt lint test test-cover build image-build demo proto proto-check bench clean

deps: $(STAMP) $(BIN)/promtool

$(STAMP): pyproject.toml
	@if ! command -v wrk >/dev/null 2>&1; then \
		echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(BIN)/promtool: | $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "extracting promtool and prometheus from Debian's prometheus package (not installed)"; \
	apt-get update -qq 2>/dev/null || echo "apt-get update failed (not root?): using the current package lists"; \
	(cd "$$tmp" && apt-get download prometheus >"$$tmp/log" 2>&1) || { cat "$$tmp/log"; exit 1; }; \
	dpkg-deb -x "$$tmp"/prometheus_*.deb "$$tmp/root"; \
	install -m 0755 "$$tmp/root/usr/bin/promtool" "$$tmp/root/usr/bin/prometheus" $(BIN)/

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

# setuptools builds in ./build: a leftover from an older checkout would put modules that
# no longer exist (the old top-level api/, nvswitch_dp/testing/) into the wheel.
build: deps
	rm -rf build
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
