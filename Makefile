# Two commands do all the set-up on a fresh machine:
#   make run    the demo on config_files/ (broker, mock services, both entry points)
#   make test   the test suite (installs what it needs: Mosquitto, Chromium, newman, Python packages)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

NEWMAN := .newman/node_modules/.bin/newman
NEWMAN_VERSION := 6.2.2

.PHONY: run test bench lint check clean deps broker browser cluster binaryen wasi-toolchain sshd fleet

$(STAMP): requirements.txt requirements-dev.txt requirements-demo.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -r requirements-demo.txt
	touch $(STAMP)

deps: $(STAMP) binaryen

# Binaryen's wasm-opt makes orchestrator modules migratable (moved with their
# state); without it they still run, and move by starting again.
binaryen:
	@command -v wasm-opt >/dev/null 2>&1 || { \
	  echo "installing binaryen"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq binaryen >/dev/null; }

# OpenSSH's server for the fleet tests (one sshd on three loopback addresses, started by the tests).
sshd:
	@test -x /usr/sbin/sshd && command -v ssh-keygen >/dev/null 2>&1 || { \
	  echo "installing openssh-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq openssh-server openssh-client >/dev/null; }

# clang and wasi-libc build the plain C program the migration tests move around.
wasi-toolchain:
	@test -x /usr/bin/clang-14 && test -d /usr/include/wasm32-wasi && test -d /usr/lib/llvm-14/lib/clang/14.0.6/lib/wasi || { \
	  echo "installing clang-14, lld-14 and wasi-libc"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 >/dev/null; }

# Mosquitto for the tests and the benchmark (the demo can do without it); openssl
# makes the certificate of the HTTPS test.
broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto >/dev/null; }
	@command -v openssl >/dev/null 2>&1 || { \
	  echo "installing openssl"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq openssl >/dev/null; }

# newman (the Postman CLI) for the API tests, from npm (Node.js and npm from apt-get when missing).
$(NEWMAN):
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }
	npm install --prefix .newman --no-save --no-audit --no-fund --loglevel=error newman@$(NEWMAN_VERSION)

# Chromium and its driver for the status page's browser test (Debian's packages).
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
	  echo "installing chromium and chromium-driver"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

run: $(STAMP)
	$(PY) demo.py

# Three nodes as one system on one broker: where each request ran, the group's statuses.
cluster: $(STAMP) broker
	$(PY) demo_cluster.py

# Three nodes on three "hosts" (127.0.0.2-4, one sshd) driven over SSH from one fleet file.
# sshd wants root here (it needs /run/sshd); run it as root or with sudo.
fleet: $(STAMP) broker sshd
	$(PY) demo_fleet.py

test: $(STAMP) broker browser binaryen wasi-toolchain sshd $(NEWMAN)
	$(PY) -m ruff check runtime_manager test bench demo.py demo_cluster.py demo_fleet.py
	$(PY) -m pytest -q test

bench: $(STAMP) broker binaryen wasi-toolchain
	$(PY) bench/bench.py

check: $(STAMP)
	$(PY) -m runtime_manager check --config-dir config_files

lint: $(STAMP)
	$(PY) -m ruff check runtime_manager test bench demo.py demo_cluster.py demo_fleet.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .newman
