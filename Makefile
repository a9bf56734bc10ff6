# The targets the README, CI and people all use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := tools/node_modules/.bin/buf
PROTOS := $(wildcard protos/jobmesh/v1/*.proto)

.PHONY: setup demo test test-fast lint fmt proto proto-check proto-baseline bench clean

setup: $(STAMP) $(BUF)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# npm ci installs exactly what the committed lock file says and never rewrites it.
$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --silent --no-audit --no-fund
	touch $(BUF)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Four at once on two cores: most tests wait on real processes and their timers, not the CPU.
test: $(STAMP)
	$(BIN)/pytest -q -n 4

# Everything but the tests that start processes (marked in tests/conftest.py): seconds.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not processes"

lint: setup proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint protos
	$(BUF) breaking protos --against protos/baseline.binpb

# The contract that `buf breaking` compares against: moved deliberately, in a commit that
# says which break it accepts (the README's "Contract changes" lists them).
proto-baseline: setup
	$(BUF) build protos -o protos/baseline.binpb

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerates jobmesh/v1 from protos/; the generated code is committed.
proto: $(STAMP)
	rm -f jobmesh/v1/*_pb2*.py jobmesh/v1/*_pb2*.pyi
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. $(PROTOS)

# Fails when the committed generated code differs from what the protos generate.
proto-check: $(STAMP)
	rm -rf .proto-check && mkdir -p .proto-check
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=.proto-check --grpc_python_out=.proto-check \
		--mypy_out=quiet:.proto-check --mypy_grpc_out=quiet:.proto-check $(PROTOS)
	diff -r -x __init__.py -x __pycache__ .proto-check/jobmesh/v1 jobmesh/v1 \
		|| (echo "generated code is stale: run 'make proto' and commit" && exit 1)
	rm -rf .proto-check

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) tools/node_modules .proto-check .pytest_cache .mypy_cache .ruff_cache
