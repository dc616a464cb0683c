# Quick start: `make run` serves on :50051, `make test` runs the suite. Both create .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
GEN := loyalty_service/gen
PROTOS := $(wildcard protos/vinr/loyalty/v1/*.proto)

.PHONY: venv protos run test lint bench check migrate chaos soak clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Generated code is built here, never committed or edited by hand.
protos: $(GEN)/.generated
$(GEN)/.generated: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN) && mkdir -p $(GEN)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=$(GEN) --grpc_python_out=$(GEN) --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	touch $@

run: protos
	$(BIN)/loyalty-service serve

migrate: protos
	$(BIN)/loyalty-service migrate

check: protos
	$(BIN)/loyalty-service check

test: protos
	$(BIN)/pytest

# The fault suite at full strength (make test runs it in a short form): kill -9 cycles,
# PostgreSQL stopped and killed, the database connection cut, 100,000 fuzzed requests,
# thousands of idle connections. Figures: docs/reliability.md.
chaos: protos
	LOYALTY_FAULT_SCALE=long $(BIN)/pytest tests/faults -s --timeout 3600 -p no:cacheprovider

# 30 minutes of mixed writes, reads and 100 subscribers; every minute's RSS, connections
# and p99, then exact balances, every event delivered, and the invariant check.
SOAK_MINUTES ?= 30
soak: protos
	$(BIN)/python -m tests.faults.soak --minutes $(SOAK_MINUTES)

lint: protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

# The benchmark's load generator is C++ on Debian's gRPC (libgrpc++-dev): the client then
# costs the shared cores about what pgbench costs them. Its build tools are installed here
# when missing (as root, or with sudo).
LOADGEN := $(BIN)/loyalty-loadgen
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
$(LOADGEN): benchmarks/loadgen.cc $(VENV)/.installed
	@if ! command -v g++ >/dev/null || ! pkg-config --exists grpc++ 2>/dev/null; then \
		echo "installing g++ and libgrpc++-dev for the load generator"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends g++ libgrpc++-dev pkg-config \
		|| { echo "could not install them: run apt-get install g++ libgrpc++-dev pkg-config"; exit 1; }; \
	fi
	g++ -O2 -std=c++17 -o $@ $< $$(pkg-config --cflags --libs grpc++)

bench: protos $(LOADGEN)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(GEN) .pytest_cache .ruff_cache
