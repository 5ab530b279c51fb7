# Fresh Debian + Python 3.11: `make run` (sample CT + detection in napari) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))
export LD_PRELOAD := $(JEMALLOC)

.PHONY: setup run test test-fast xvfb clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel, so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[pyqt5,testing]'
	touch $@

# Qt needs a display for OpenGL (image layers); Xvfb gives a virtual one.
xvfb:
	@command -v xvfb-run >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libjemalloc2 >/dev/null; }

# Opens napari with the bundled chest CT and runs detection on it. Without a display it
# runs under Xvfb and saves a screenshot to demo.png instead of waiting for a window.
run: setup xvfb
	@if [ -n "$$DISPLAY" ]; then $(BIN)/python -m napari_resmtnet demo; \
	else xvfb-run -a -s '-screen 0 1280x1024x24' $(BIN)/python -m napari_resmtnet demo --screenshot demo.png; fi

test: setup xvfb
	QT_QPA_PLATFORM=offscreen xvfb-run -a -s '-screen 0 1280x1024x24' $(BIN)/python -m pytest -ra

clean:
	rm -rf $(VENV) build *.egg-info
