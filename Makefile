# skyscript-build: one target per stage, plus setup, demo, test and bench.
# Every target uses the virtual environment .venv/ that `make setup` creates.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/skyscript-build
PIPELINE ?= pipelines/demo_helsinki.yaml
# The torch pair installed first (files on this machine's disk); override elsewhere, e.g.
# `make setup TORCH_PACKAGES="torch torchvision"`. setup.cfg keeps a range.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: setup lint test docs demo demo-data all extract plan fetch captions filter report \
        bench bench-extract bench-plan bench-scale bench-emulator bench-fetch bench-caption \
        bench-filter bench-polish system-deps-test system-deps-bench clean

setup: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -e '.[clip,test,bench]'
	touch $@

# Debian packages, installed only by the targets that need them.
define apt_install
	@if ! command -v $(1) >/dev/null 2>&1; then \
	  echo "installing $(2) from Debian's packages"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(2) >/dev/null; \
	fi
endef

system-deps-test:
	$(call apt_install,chromium,chromium)
	$(call apt_install,osmium,osmium-tool)

system-deps-bench:
	$(call apt_install,osmium,osmium-tool)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup system-deps-test lint
	$(VENV)/bin/pytest

# docs/settings.md: every flag and pipeline key, from the settings declared on the configs
docs: setup
	$(CLI) schema --markdown > docs/settings.md.tmp && mv docs/settings.md.tmp docs/settings.md

# --- the pipeline, stage by stage (PIPELINE=pipelines/x.yaml) ---------------------------

demo-data: setup
	$(CLI) orthophoto --pbf data/helsinki.osm.pbf --out build/demo-data

demo: setup demo-data
	$(CLI) run pipelines/demo_helsinki.yaml

all: setup
	$(CLI) run $(PIPELINE)

extract plan fetch filter report: setup
	$(CLI) run $(PIPELINE) --stage $@

captions: setup
	$(CLI) run $(PIPELINE) --stage caption

# --- benchmarks: each compares against a peer or bound in one run, see bench/RESULTS.md ---

bench: bench-extract bench-plan bench-scale bench-emulator bench-fetch bench-caption bench-filter \
       bench-polish

bench-extract: setup system-deps-bench
	$(PY) bench/bench_extract.py

bench-plan: setup
	$(PY) bench/bench_plan.py

bench-scale: setup system-deps-bench
	$(PY) bench/bench_scale.py

bench-emulator: setup demo-data
	$(PY) bench/bench_emulator.py

bench-fetch: setup demo-data
	$(PY) bench/bench_fetch.py

bench-caption: setup
	$(PY) bench/bench_caption.py

bench-filter: setup
	$(PY) bench/bench_filter.py

bench-polish: setup
	$(PY) bench/bench_polish.py

clean:
	rm -rf build bench/data bench/out
