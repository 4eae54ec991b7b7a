# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   trains an Attention U-Net on real nuclei images, evaluates, draws and exports it
#   make test   runs the test suite
# Both create .venv, install the package with its dev extra and the two wheels that
# ship the built-in datasets, and install Graphviz with apt-get when `dot` is missing;
# make test also installs Chromium (headless, for the report's browser test).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := build/demo
# Wheels read for their data files only (never imported): no dependencies needed.
DATA_WHEELS := stardist==0.9.2 nilearn==0.14.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A download cut off mid-way (TensorFlow's wheel is 570 MB) once failed a fresh install:
# pip resumes an interrupted download up to 20 times, and each step is tried 3 times.
PIP := $(BIN)/python -m pip install -q --resume-retries 20
retry = for attempt in 1 2 3; do $(1) && break; \
  if [ $$attempt = 3 ]; then exit 1; fi; \
  echo "pip failed (attempt $$attempt of 3); trying again in 15 s"; sleep 15; done

.PHONY: install graphviz chromium demo test clean

install: $(STAMP) graphviz

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python venv is missing; installing python3-venv with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(call retry,$(BIN)/python -m pip install -q --upgrade pip)
	$(call retry,$(PIP) -e ".[dev]")
	$(call retry,$(PIP) --no-deps $(DATA_WHEELS))
	touch $(STAMP)

graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  echo "Graphviz 'dot' is missing; installing it with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q graphviz; }

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Chromium is missing; installing it with apt-get (the report's browser test)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

demo: install
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/attunet-keras summary
	$(BIN)/attunet-keras plot --output $(DEMO_DIR)/att_unet.png
	$(BIN)/attunet-keras train --dataset nuclei --output $(DEMO_DIR)/nuclei \
	  --epochs 30 --steps-per-epoch 20
	$(BIN)/attunet-keras predict --run $(DEMO_DIR)/nuclei --output $(DEMO_DIR)/predictions
	$(BIN)/attunet-keras attention --run $(DEMO_DIR)/nuclei --output $(DEMO_DIR)/attention.png
	$(BIN)/attunet-keras export --run $(DEMO_DIR)/nuclei --output $(DEMO_DIR)/saved_model
	@echo "Demo outputs in $(DEMO_DIR)/: att_unet.png, nuclei/ (the run), predictions/, attention.png, saved_model/"

# Two pytest workers (pytest-xdist), shared out file by file, so that a module's
# module-scoped fixtures are built once.
test: install chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf build .pytest_cache *.egg-info
