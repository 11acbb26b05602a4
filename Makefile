# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv once.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test model clean

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

# Train the default bundle from scratch (phantoms -> canonical data -> step 1 -> step 3 -> bundles),
# with the committed recipe in Resources/Models/recipe: about 20 minutes of data and 25 of training on 2 CPU cores.
RECIPE := Resources/Models/recipe
model: setup
	$(BIN)/tibia-recon prepare --phantoms 320 --seed 1000 --out data/train --workers 2 --overwrite
	$(BIN)/tibia-recon prepare --phantoms 40 --seed 900000 --out data/val --workers 2 --overwrite
	$(BIN)/tibia-recon train step1 --config $(RECIPE)/step1.json
	$(BIN)/tibia-recon train step3 --config $(RECIPE)/step3.json
	$(BIN)/tibia-recon export-bundle --step1 runs/default/step1 --step3 runs/default/step3 --ae pca32x2 --locnet step1 --float16 --out runs/default/bundle --overwrite
	$(BIN)/tibia-recon export-bundle --step1 runs/default/step1 --step3 runs/default/step3 --ae vae --out runs/default/bundle-vae --overwrite

clean:
	rm -rf $(VENV) demo-output .pytest_cache
