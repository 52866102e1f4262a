# lockd.virtlockd — top-level entry points.
#   make demo   set up and run the demonstration: Ansible rollout to a systemd host, two VMs one disk
#   make test   install everything a fresh Debian 12 machine needs, run the whole suite
#
# Extending: add your target in the marked section near the end; depend on
# `venv` (and `deps` if you need apt packages). Put apt packages in
# scripts/install-deps.sh and pip packages in a requirements/*.txt file
# (every file there is installed into .venv).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VENV_BIN := $(CURDIR)/$(VENV)/bin
REQUIREMENTS := $(sort $(wildcard requirements/*.txt))
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k diff -x"
PYTEST_ARGS ?=
# Every tool the tests shell out to (pytest, ansible-*, molecule, virtlockd) comes from the venv.
RUN := PATH="$(VENV_BIN):$$PATH"

.PHONY: help deps venv test test-unit test-diff test-e2e test-reliability demo demo-local clean

help:
	@echo "make demo              Ansible rollout to a systemd host; two VMs, one disk: the second refused, also after SIGKILL of the lock daemon"
	@echo "make demo-local        two VMs, one disk with this machine's libvirtd + QEMU (no Ansible)"
	@echo "make test              install dependencies, run the whole test suite (ends with pytest's summary)"
	@echo "make test-unit|test-diff|test-e2e|test-reliability   one group only"
	@echo "make bench [QUICK=1]   benchmarks against the C virtlockd (docs/benchmarks.md; QUICK=1: smoke, <1 min)"
	@echo "make deps              apt packages and users only (scripts/install-deps.sh)"
	@echo "make venv              .venv from requirements/*.txt plus lockd_src (editable)"

deps:
	@scripts/install-deps.sh

# The stamp is rebuilt when a requirements file or the package metadata changes.
$(VENV)/.stamp: $(REQUIREMENTS) $(wildcard lockd_src/pyproject.toml)
	@echo "[venv] creating $(VENV) with $(PYTHON) from $(REQUIREMENTS)"
	@test -x $(VENV_BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(VENV_BIN)/python -m pip install --quiet --disable-pip-version-check $(addprefix -r ,$(REQUIREMENTS))
	@test -f lockd_src/pyproject.toml || { echo "[venv] ERROR: lockd_src/pyproject.toml missing" >&2; exit 1; }
	@$(VENV_BIN)/python -m pip install --quiet --disable-pip-version-check -e ./lockd_src
	@touch $@
	@echo "[venv] ready: $(VENV_BIN)"

venv: $(VENV)/.stamp

test: deps venv
	$(RUN) $(VENV_BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/unit $(PYTEST_ARGS)
test-diff: deps venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/diff $(PYTEST_ARGS)
test-e2e: deps venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)
test-reliability: deps venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)

demo: deps venv
	$(RUN) scripts/demo.sh rollout
demo-local: deps venv
	$(RUN) scripts/demo.sh local

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# ---------------------------------------------------------------------------
# Targets owned by other areas. Add yours below its marker.
# ---------------------------------------------------------------------------

# --- bench (bench/**): `make bench`, `make bench QUICK=1` ---
.PHONY: bench
# make bench             ~10 min: C virtlockd vs ours, writes docs/benchmarks.{md,png,json}
# make bench QUICK=1     every scenario with tiny counts (<1 min), output in a temp dir
# make bench BENCH_ARGS="--only acqrel,idle --daemons py"
QUICK ?=
BENCH_ARGS ?=
bench: deps venv
	$(RUN) $(VENV_BIN)/python -m bench $(if $(QUICK),--quick) $(BENCH_ARGS)


# --- lint: ansible-lint, antsibull-docs (collection) ---
# Both run inside pytest (tests/collection/test_static.py), so `make test` runs them too.
.PHONY: lint
lint: venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/collection/test_static.py -k "lint or defaults or unit_files" $(PYTEST_ARGS)

# --- sanity: ansible-test sanity tree under ansible_collections/ (collection) ---
# Prepares ansible_collections/lockd/virtlockd and runs ansible-test sanity --python 3.11
# (pinned per-test venvs cached in .cache/ansible-test-home), plus build/install/ansible-doc.
.PHONY: sanity test-collection
sanity: venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/collection/test_static.py -k "sanity or target_pythons or build" $(PYTEST_ARGS)
test-collection: venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/collection tests/conformance $(PYTEST_ARGS)

# --- rootfs / molecule (hosts) ---
# make rootfs                      build/cache the nspawn host rootfs tarballs (.cache/rootfs)
# make molecule SCENARIO=<name>    one Molecule scenario (extensions/molecule/README.md)
# make test-systemd                tests/systemd (our daemon under a real systemd) + tests/molecule
SCENARIO ?= default
.PHONY: rootfs molecule test-systemd
rootfs: deps
	scripts/build-rootfs.sh
molecule: deps venv
	$(RUN) $(VENV_BIN)/molecule test -s $(SCENARIO)
test-systemd: deps venv
	$(RUN) $(VENV_BIN)/python -m pytest tests/systemd tests/molecule $(PYTEST_ARGS)

