# The README's two commands: `make demo` (tmb's main job) and `make test`.
# Each installs what it needs: Debian packages (when missing), a virtualenv, the package.

VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.tmb-installed
# gcc, libssl-dev, python3-dev: the IMA replay's C extension (setup.py; tmb runs without it, slower).
APT_PKGS  := swtpm swtpm-tools libtss2-dev pkg-config cryptsetup-bin erofs-utils tpm2-tools systemd chromium postgresql ima-evm-utils gcc libssl-dev python3-dev
# Commands whose absence means the Debian packages above still need installing.
APT_BINS  := swtpm swtpm_setup veritysetup mkfs.erofs pkg-config tpm2_quote systemd-analyze chromium evmctl gcc
# Python.h for $(PYTHON) (a Debian python3 needs python3-dev; pyenv's and others' ship their own).
HAS_PY_H  := $(PYTHON) -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# What `make bench` adds (bench/bench_proxy.py's load generator and peer proxy); the commands are named alike.
BENCH_PKGS := wrk nginx

.PHONY: all deps venv test lint typecheck unit demo bench clean

all: test

deps:
	@missing=""; for b in $(APT_BINS); do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	pkg-config --exists tss2-esys 2>/dev/null || missing="$$missing libtss2-dev"; \
	pkg-config --exists libcrypto 2>/dev/null || missing="$$missing libssl-dev"; \
	$(HAS_PY_H) 2>/dev/null || dpkg -s python3-dev >/dev/null 2>&1 || missing="$$missing python3-dev"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PKGS); \
	fi

$(STAMP): pyproject.toml setup.py tmb/attest/_imafast.c | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

venv: deps $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	PATH=/usr/sbin:$$PATH $(VENV)/bin/pytest -q -ra

test: lint typecheck unit

demo: venv
	PATH=/usr/sbin:$$PATH $(VENV)/bin/python -m tmb demo

bench: venv
	@missing=""; for b in $(BENCH_PKGS); do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(BENCH_PKGS); \
	fi
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build tmb/attest/_imafast*.so
