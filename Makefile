# BranchGuard: `make demo` and `make test` each do the whole set-up on a fresh machine and are safe to
# run twice. Set-up = Debian packages (scripts/setup.sh), a virtualenv at .venv with the project
# installed (plus the compiled hot path from native/, which needs cargo; without cargo, or with NATIVE=0,
# the guard runs its pure-Python path: same output, slower), then the
# local stack (Kafka, Kafka Connect + Debezium, PostgreSQL, Redis) via `guard stack up`.

VENV    ?= .venv
PYTHON  ?= python3
GUARD   := $(VENV)/bin/guard
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup system venv stack demo run test unit lint bench down clean

setup: system venv

system:
	bash scripts/setup.sh

venv: $(STAMP)

# The compiled extension is rebuilt when any of its sources changes, not only lib.rs.
NATIVE_SRC := $(wildcard native/src/*.rs) native/Cargo.toml native/Cargo.lock native/pyproject.toml

$(STAMP): pyproject.toml $(NATIVE_SRC)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	bash scripts/build-native.sh $(VENV)
	touch $(STAMP)

stack: setup
	$(GUARD) stack up

demo: stack
	$(GUARD) demo

# Keep sanitizing: a worker in the foreground (Ctrl-C stops it cleanly) in the default group, so it
# continues exactly where the demo stopped.
run: stack
	$(GUARD) run

# The static checks first: a lint failure stops the run before the stack starts.
test: lint stack
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

# Static checks (ruff, mypy; rustfmt, clippy and the crate's tests when cargo is there): scripts/lint.sh.
lint: venv
	bash scripts/lint.sh $(VENV)

bench: stack
	$(GUARD) bench

down:
	$(GUARD) stack down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
