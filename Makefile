# Grizz: `make run` starts the service, `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The test suite runs on this machine's PostgreSQL (its own database per run) and Redis.
# (Only read, by makemigrations --check; pytest creates and drops test_grizz_<pid>.)
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
export REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: run test lint format bench install clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

run: install
	@$(PY) scripts/run.py

# What the tests (and mypy, whose Django plugin imports the settings) run with.
TEST_ENV := DATABASE_URL=$(TEST_DATABASE_URL) DJANGO_DEBUG=0 \
	DJANGO_SECRET_KEY=grizz-test-only-not-a-secret-0123456789

# Two test processes (pytest-xdist), whole files to one process so that a module's shared
# servers (the browser tests' daphne, worker and Chromium) start once.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: install lint
	$(TEST_ENV) $(PY) manage.py makemigrations --check --dry-run
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# mypy checks the `files` listed in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(TEST_ENV) $(VENV)/bin/mypy

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The bench starts its own Redis, database and Grizz processes (see bench/README.md);
# e.g. `make bench BENCH_ARGS=--quick` for a smoke run.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var staticfiles
