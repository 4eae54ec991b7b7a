# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make demo   builds, inspects and exports the reference Attention U-Net
#   make test   runs the test suite
# Both create .venv, install the package with its dev extra and, when Graphviz's
# `dot` is missing, install Graphviz with apt-get.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := build/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install graphviz demo test clean

install: $(STAMP) graphviz

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python venv is missing; installing python3-venv with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  echo "Graphviz 'dot' is missing; installing it with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q graphviz; }

demo: install
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/attunet-keras summary
	$(BIN)/attunet-keras plot --output $(DEMO_DIR)/att_unet.png
	$(BIN)/attunet-keras export --output $(DEMO_DIR)/saved_model
	@echo "Demo outputs in $(DEMO_DIR)/: att_unet.png, saved_model/"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf build .pytest_cache *.egg-info
