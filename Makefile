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

.PHONY: setup gl demo test test-fast grade-check full lab student marimo datasets bench docs clean

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
	$(BIN)/python -m pip install -q -e ".[dev,pusht,minari,language]"
	touch $(STAMP)

demo: setup
	$(BIN)/labkit demo

# Two pytest workers on two cores, one torch thread each: with two OpenMP threads per process the
# workers' threads spin against each other and training ran ~50x slower (measured here).
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=15 -m "not grading"

# Everything but the lesson notebooks and the slow runs (DDP, LightningCLI, browser, demo): a quick check.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not notebook and not slow and not grading"

# labkit grade on every lesson: the solution scores full marks, the student copy zero, and a copy whose
# exercises hand back labkit's own functions fails their hidden tests (three FAST runs a lesson, ~30 min).
grade-check: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m grading tests/test_grade.py

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

# Every lesson in full mode (FAST=False): results/full.json and README's generated results block.
full: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m labkit.teach.full

# The course site: every lesson executed in FAST mode, solutions hidden, outputs kept (Jupyter Book).
docs: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m labkit.teach.site

# The LeRobot round trip, both ways, on every shipped dataset (tools/interop.py prints the table). LeRobot
# lives in its own virtual environment: lerobot 0.4.4 pins torch<2.11 (a multi-GB CUDA build here), so it
# is installed without its dependencies beside the CPU torch 2.13 and the runtime ones its dataset code uses.
LEROBOT_VENV  := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed

$(LEROBOT_STAMP): tools/interop-requirements.txt
	test -x $(LEROBOT_VENV)/bin/python || $(PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LEROBOT_VENV)/bin/python -m pip install -q -r tools/interop-requirements.txt
	$(LEROBOT_VENV)/bin/python -m pip install -q --no-deps lerobot==0.4.4
	touch $(LEROBOT_STAMP)

interop: setup $(LEROBOT_STAMP)
	rm -rf runs/interop && mkdir -p runs
	OMP_NUM_THREADS=1 $(LEROBOT_VENV)/bin/python tools/interop.py lerobot runs/interop > runs/interop.log 2>&1 \
	  || { tail -30 runs/interop.log; exit 1; }
	OMP_NUM_THREADS=1 $(BIN)/python tools/interop.py labkit runs/interop

clean:
	rm -rf runs lightning_logs .pytest_cache
