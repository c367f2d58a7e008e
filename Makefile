# Two commands a newcomer needs: `make demo` and `make test`; `make chaos` (root) runs the chaos suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench chaos lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# the virtualenv with the project and its test extra; then `. .venv/bin/activate`
install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# four test workers (pytest-xdist): most tests wait on node processes; a module sharing its nodes stays on one worker
test: lint
	$(BIN)/python -m pytest -q -n 4 --dist loadgroup

demo: install
	$(BIN)/python cli.py demo

bench: install
	$(BIN)/python benchmarks/matching.py
	$(BIN)/python benchmarks/finality.py
	$(BIN)/python benchmarks/cluster.py
	$(BIN)/python benchmarks/sync.py
	$(BIN)/python benchmarks/memory.py

# every nemesis against 5 nodes in network namespaces (about 7 minutes; needs root, iproute2, iptables)
chaos: install
	$(BIN)/python -m tests.chaos

clean:
	rm -rf $(VENV) data logs .pytest_cache .mypy_cache .ruff_cache .hypothesis
