# `make run` starts the system, `make test` runs every check. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: run test lint format

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

run: $(VENV)/.installed vendor/node_modules/.installed
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py demo
	$(PY) manage.py serve --port $(PORT)

# Browser libraries the dashboard serves (vendor/package.json: uPlot), pinned by the lockfile.
vendor/node_modules/.installed: vendor/package-lock.json
	npm ci --prefix vendor --no-audit --no-fund --loglevel=error
	touch $@

# Node test dependencies (tests/js: playwright-core, vue, ws, phoenix), again when the lockfile
# changes, and Debian's Chromium for the browser tests (CI runs as root; skipped when present).
tests/js/node_modules/.installed: tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
	touch $@

test: $(VENV)/.installed vendor/node_modules/.installed tests/js/node_modules/.installed
	@test -x /usr/bin/chromium || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
