# Two commands do everything on a fresh machine: `make run` and `make test`.
# Every target creates the virtual environment and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FHIR_SERVER_DIR := tests/fhir_server
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install serve-prod bench fuzz load clean docs node-deps browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The Node FHIR test server (Medplum router + in-memory repository), pinned by package-lock.json.
node-deps:
	@if [ -f $(FHIR_SERVER_DIR)/package-lock.json ]; then \
	  if [ ! -d $(FHIR_SERVER_DIR)/node_modules ] || [ $(FHIR_SERVER_DIR)/package-lock.json -nt $(FHIR_SERVER_DIR)/node_modules ]; then \
	    (cd $(FHIR_SERVER_DIR) && npm ci --no-audit --no-fund --loglevel=error) && touch $(FHIR_SERVER_DIR)/node_modules; \
	  fi; \
	fi

# Local demo: embedded SQLite, JWT checks OFF (loud warning), loopback only.
run: install
	RPL_CDS_AUTH=$${RPL_CDS_AUTH:-disabled} RPL_CDS_LOCAL_MODE=1 $(BIN)/rpl-cds serve --host $(HOST) --port $(PORT)

# Production-style start under gunicorn (see gunicorn.conf.py).
serve-prod: install
	$(BIN)/gunicorn -c gunicorn.conf.py 'service:create_app()'

# Headless Chromium + chromedriver for the browser tests (Debian packages; installed when root).
browser-deps: install
	$(BIN)/python -c "from tests.browser_support import ensure_chromium; r = ensure_chromium(); print(r or 'chromium ready')"

test: install node-deps browser-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

docs: install
	$(BIN)/rpl-cds rules --format markdown > docs/rules.md

# Benchmark (not part of make test): `make bench` (~6 min) or `make bench BENCH_ARGS=--quick` (1-2 min).
bench: install node-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

# Longer property-based runs (schemathesis + hypothesis mutations), about 4 minutes on 2 cores.
fuzz: install
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-1000} $(BIN)/python -m pytest -q tests/test_fuzz.py tests/test_bad_input.py -k "conforms_to_openapi or mutated"

# Bounded load test on 127.0.0.1, under 2 minutes; LOAD_ARGS=--postgres for PostgreSQL.
load: install
	$(BIN)/python -m loadtest $(LOAD_ARGS)

clean:
	rm -rf $(VENV) $(FHIR_SERVER_DIR)/node_modules instance .pytest_cache
