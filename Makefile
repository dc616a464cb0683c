# Quick start: `make run` serves on :50051, `make test` runs the suite. Both create .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
GEN := loyalty_service/gen
PROTOS := $(wildcard protos/vinr/loyalty/v1/*.proto)

.PHONY: venv protos run test lint bench check migrate clean

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

lint: protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

# The benchmark's load generator is C++ on Debian's gRPC (libgrpc++-dev), installed here
# when missing, so the client costs the shared cores about what pgbench costs them.
LOADGEN := $(BIN)/loyalty-loadgen
$(LOADGEN): benchmarks/loadgen.cc $(VENV)/.installed
	pkg-config --exists grpc++ || $(APT_INSTALL) libgrpc++-dev pkg-config
	g++ -O2 -std=c++17 -o $@ $< $$(pkg-config --cflags --libs grpc++)

APT_INSTALL := $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y --no-install-recommends

bench: protos $(LOADGEN)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(GEN) .pytest_cache .ruff_cache
