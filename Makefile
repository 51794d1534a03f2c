# labkit: `make demo` and `make test` work on a fresh machine; each sets itself up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages MuJoCo needs to render headless through EGL with Mesa (no GPU, no display), and the
# browser the widget test drives through Playwright (Debian's chromium: no browser download at run time).
GL_PKGS := libegl1 libegl-mesa0 libgl1-mesa-dri libgles2 chromium fonts-dejavu-core
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

.PHONY: setup gl demo test test-fast lab student marimo datasets bench docs clean

setup: gl $(STAMP)

gl:
	@dpkg -s $(GL_PKGS) >/dev/null 2>&1 || { \
	  echo "Installing system packages: $(GL_PKGS)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(GL_PKGS); }

# torch is installed first and pinned: 2.13.0 is the CPU build on a CPU machine, and anything that
# later asks for torch (Lightning included) is then satisfied instead of pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,pusht,minari]"
	touch $(STAMP)

demo: setup
	$(BIN)/labkit demo

# Two pytest workers on two cores, one torch thread each: with two OpenMP threads per process the
# workers' threads spin against each other and training ran ~50x slower (measured here).
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15

# Everything but the lesson notebooks and the slow runs (DDP, LightningCLI, browser, demo): a quick check.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not notebook and not slow"

lab: setup
	$(BIN)/jupyter lab --allow-root --notebook-dir=notebooks

student: setup
	$(BIN)/python -m labkit.teach.student

marimo: setup
	$(BIN)/marimo edit demos

datasets: setup
	$(BIN)/labkit datasets

bench: setup
	$(BIN)/python benchmarks/run.py

# The course site: every lesson executed in FAST mode, solutions hidden, outputs kept (Jupyter Book).
docs: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m labkit.teach.site

clean:
	rm -rf runs lightning_logs .pytest_cache
