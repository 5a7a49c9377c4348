# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs: Debian's fuse3/libfuse3-dev/pkg-config (pyfuse3 builds against
# libfuse3 and has no wheels), then the package and its test extras into .venv.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := fuse3 libfuse3-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint system-deps clean

demo: $(STAMP)
	$(VENV)/bin/python devtools/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check s3datafs tests devtools bench

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .demo build *.egg-info .pytest_cache .ruff_cache
