# Fresh Debian + Python 3.11: `make run` (sample CT + detection in napari) and `make test`.
# `make help` lists the targets; CONTRIBUTING.md explains them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

# torch: pinned, and the CPU build unless this machine has an NVIDIA GPU. On Linux the
# plain PyPI wheel is the CUDA build (several GB of nvidia packages), so without a GPU torch
# comes from PyTorch's CPU wheel index. Override on the command line:
#   make setup TORCH_INDEX=                                          # the default index (PyPI)
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126    # a CUDA build
# When the index cannot be reached (an offline mirror, a firewall), setup says so and falls
# back to the default index.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

# Debian packages: the venv module, Xvfb, and the libraries Qt's xcb platform plugin loads.
# Qt needs the latter whether or not Xvfb is there (a desktop may lack them too).
DEBS := python3-venv xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
        libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb-xfixes0 \
        libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3 libjemalloc2

# The whole tree is in `ruff format` style; `make lint` checks it, `make format` applies it.
FORMATTED := .

XVFB_RUN := xvfb-run -a -s '-screen 0 1280x1024x24'
PYTEST_FAST := -m "not gui and not data and not slow"

JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))
export LD_PRELOAD := $(JEMALLOC)

.PHONY: help setup sysdeps xvfb run test test-fast lint format clean

help:
	@echo "make run        set up .venv, open napari with the sample chest CT and detect its nodules"
	@echo "make test       set up .venv, lint, run the whole test suite headless (Xvfb)"
	@echo "make test-fast  lint and the tests that need no GUI, no data and no time (< 60 s)"
	@echo "make lint       ruff check, ruff format --check, mypy (core)"
	@echo "make format     ruff format the whole tree"
	@echo "make setup      only the .venv (TORCH_INDEX=... to choose the torch build)"
	@echo "make sysdeps    only the Debian packages (python3-venv, Xvfb, Qt's X libraries)"
	@echo "make pacs       a local Orthanc PACS (DICOMweb) holding the sample chest CT"
	@echo "make clean      remove .venv and build outputs"

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "make: '$(PYTHON)' is missing or older than Python 3.10; install Python 3.10+ or run make PYTHON=python3.11"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: '$(PYTHON) -m venv' cannot work: the python3-venv package is missing."; \
	  echo "      Install it with 'sudo apt-get install python3-venv' (or run 'make sysdeps'), then run make again."; exit 1; }
	@if [ -x $(BIN)/python ]; then echo "==> [1/4] $(VENV) exists: updating it"; \
	else echo "==> [1/4] creating $(VENV) with $$($(PYTHON) --version)" && $(PYTHON) -m venv $(VENV); fi
	@echo "==> [2/4] upgrading pip"
	$(PIP) install --quiet --upgrade pip
	@echo "==> [3/4] torch $(TORCH_VERSION) ($(if $(TORCH_INDEX),from $(TORCH_INDEX),from the default index))"
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)' "$(TORCH_INDEX)" 2>/dev/null; then \
	  echo "$(PIP) install --no-deps --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)"; \
	  $(PIP) install --no-deps --index-url "$(TORCH_INDEX)" "torch==$(TORCH_VERSION)" && \
	  echo "$(PIP) install torch==$(TORCH_VERSION)   # its dependencies, from the default index" && \
	  $(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
	  if [ -n "$(TORCH_INDEX)" ]; then echo "    $(TORCH_INDEX) cannot be reached: torch comes from the default index"; fi; \
	  echo "$(PIP) install torch==$(TORCH_VERSION)"; \
	  $(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	@echo "==> [4/4] napari-resmtnet, napari, PyQt5 and the test tools (a few minutes on a fresh machine)"
	$(PIP) install -e '.[pyqt5,testing]'
	@$(BIN)/python -c 'import torch; print("    torch", torch.__version__, "CUDA" if torch.cuda.is_available() else "CPU")'
	touch $@

# Installs the Debian packages that are missing (needs root or sudo); elsewhere it only
# names what Qt and the venv need.
sysdeps:
	@if ! command -v dpkg-query >/dev/null; then \
	  echo "make: not a Debian system: make sure python3 -m venv works, and for the GUI that Xvfb and"; \
	  echo "      Qt's xcb libraries are installed ($(DEBS))"; exit 0; fi; \
	missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "==> installing Debian packages:" $$missing; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

xvfb: sysdeps

# Opens napari with the bundled chest CT and runs detection on it. Without a display it
# runs under Xvfb and saves a screenshot to demo.png instead of waiting for a window.
run: sysdeps setup
	@if [ -n "$$DISPLAY" ]; then $(BIN)/resmtnet demo; \
	else $(XVFB_RUN) $(BIN)/resmtnet demo --screenshot demo.png; fi

test: sysdeps setup lint
	QT_QPA_PLATFORM=offscreen $(XVFB_RUN) $(BIN)/python -m pytest -ra

# No GUI, no data, nothing slow: the loop to run while editing. RESMTNET_DATA points
# nowhere, so tests that would read the training data skip even where it exists.
test-fast: setup lint
	QT_QPA_PLATFORM=offscreen RESMTNET_DATA=$(CURDIR)/.no-data $(BIN)/python -m pytest -q $(PYTEST_FAST)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format $(FORMATTED)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache

# A local PACS: Orthanc with its DICOMweb plugin on 127.0.0.1 (scripts/orthanc.sh; needs the
# Debian packages orthanc and orthanc-dicomweb) holding the sample chest CT as a DICOM series.
# `scripts/orthanc.sh stop` stops it and deletes its storage.
.PHONY: pacs
pacs: setup
	scripts/orthanc.sh start
	$(BIN)/python scripts/pacs_demo.py
