# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv once.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so no later requirement can pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[phantoms,test]'
	touch $(STAMP)

demo: setup
	$(BIN)/tibia-recon demo --out demo-output --overwrite

test: setup
	$(BIN)/python -m pytest -q Testing

clean:
	rm -rf $(VENV) demo-output .pytest_cache
