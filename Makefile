# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs: Debian's fuse3/libfuse3-dev/pkg-config (pyfuse3 builds against
# libfuse3 and has no wheels), then the package and its test extras into .venv.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := fuse3 libfuse3-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test fuzz lint system-deps install-helper bench bench-deps bench-zip bench-zip-deps clean

demo: $(STAMP)
	$(VENV)/bin/python devtools/demo.py

# The tests start the command line hundreds of times: compile it first, even where the environment
# says not to write bytecode (PYTHONDONTWRITEBYTECODE), or each start compiles ~50 modules again.
test: $(STAMP)
	$(VENV)/bin/python -m compileall -q s3datafs devtools
	$(VENV)/bin/python -m pytest tests

# The property tests with examples no run has drawn before (`make test` draws the same ones each
# time, so that CI repeats itself): FUZZ_RUNS rounds; a failure prints the blob that replays it.
FUZZ_RUNS ?= 3
fuzz: $(STAMP)
	$(VENV)/bin/python -m compileall -q s3datafs devtools
	for round in $$(seq $(FUZZ_RUNS)); do \
	  HYPOTHESIS_PROFILE=explore $(VENV)/bin/python -m pytest -q \
	    $$(grep -l '^from hypothesis\|^import hypothesis' tests/test_*.py) || exit 1; \
	done

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

# mount(8) looks for mount.<type> helpers in /sbin only: link ours there (mount -t s3datafs, fstab).
HELPER ?= $(abspath $(VENV))/bin/mount.s3datafs
# The kernel calls our mounts fuse.s3datafs: mount(8) runs mount.fuse.s3datafs for a remount.
install-helper: $(STAMP)
	$(SUDO) ln -sf $(HELPER) /sbin/mount.s3datafs
	$(SUDO) ln -sf $(HELPER) /sbin/mount.fuse.s3datafs
	@echo "installed /sbin/mount.s3datafs and /sbin/mount.fuse.s3datafs -> $(HELPER)"

# Read benchmark against s3fs-fuse and rclone (bench/RESULTS.md). Needs root: it mounts and drops
# the page cache. A quick run: make bench BENCH_ARGS=--quick
BENCH_ARGS ?=
BENCH_PACKAGES := rclone s3fs
BENCH_STAMP := $(VENV)/.bench-installed

bench: $(BENCH_STAMP)
	$(VENV)/bin/python -m bench.bench_reads $(BENCH_ARGS)
	$(VENV)/bin/python -m bench.chart

bench-deps:
	@missing=$$(for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Zip benchmark (issue 7; bench/RESULTS.md): a 1 GiB zip of 20,000 members mounted by s3datafs
# against download-and-extract, zipfile over rclone mount and fuse-zip. Root, like bench.
# A quick run: make bench-zip BENCH_ARGS=--quick
BENCH_ZIP_PACKAGES := rclone fuse-zip

bench-zip: $(BENCH_STAMP) | bench-zip-deps
	$(VENV)/bin/python -m bench.bench_zip $(BENCH_ARGS)

bench-zip-deps:
	@missing=$$(for p in $(BENCH_ZIP_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(BENCH_STAMP): $(STAMP) | bench-deps
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) .demo build *.egg-info .pytest_cache .ruff_cache
