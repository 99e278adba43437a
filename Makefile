# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv, install system libraries they need when allowed, and the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch: a CUDA build where an NVIDIA driver is loaded (PyPI's default Linux wheel), the
# CPU build elsewhere (2.13.0 installs in seconds). Any torch >= 2.3 works: override
# with e.g. `make test TORCH='torch==2.13.0'`. A venv that already has torch keeps it.
NVIDIA := $(shell { test -e /proc/driver/nvidia/version || nvidia-smi -L; } >/dev/null 2>&1 && echo yes)
TORCH  ?= $(if $(NVIDIA),torch,torch==2.13.0)
DEMO_DATA ?= demo-data
DEMO_RUN  ?= demo-run
# Run a system command as root when we are root or may sudo; otherwise say what is missing.
ASROOT := $(shell if [ "$$(id -u)" = 0 ]; then echo; elif sudo -n true 2>/dev/null; then echo sudo -n; else echo false; fi)

.PHONY: demo test bench chaos sysdeps testdeps install clean

# The daemon on generated shards, on the CPU: start it detached, watch `status` a few
# times while it trains, then stop it (it leaves a checkpoint in $(DEMO_RUN)/checkpoints).
DEMO_FLAGS ?= --batch-size 32 --lr 0.0025 --augmenters 1 --bias-init caffe --lr-patience 2 --max-epochs 20 --log-every 2
demo: install
	@test -f $(DEMO_DATA)/manifest.json || $(BIN)/alexnetd fake-data $(DEMO_DATA) --classes 4 --train-per-class 64 --val-per-class 16 --shards 2
	$(BIN)/alexnetd start --data $(DEMO_DATA) --run-dir $(DEMO_RUN) --fresh $(DEMO_FLAGS)
	@for i in 1 2 3; do sleep 20; $(BIN)/alexnetd status --run-dir $(DEMO_RUN) || true; echo; done
	$(BIN)/alexnetd stop --run-dir $(DEMO_RUN)

test: install testdeps
	@$(BIN)/python -c 'import nvidia.dali' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,dali]' || \
	  echo "note: the dali extra did not install; the --decoder dali tests will be skipped"
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/pip install -q -e '.[dev,dali]'
	$(BIN)/python bench/input.py

# Reliability figures (RELIABILITY.md): kills, full disks, bad files, hostile frames, soak.
# The full suite takes hours on 2 cores; `make chaos CHAOS_FLAGS=--quick` takes minutes.
CHAOS_FLAGS ?=
chaos: install
	$(BIN)/python bench/chaos.py $(CHAOS_FLAGS)

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml | sysdeps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { $(ASROOT) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@echo "torch: $(if $(NVIDIA),an NVIDIA driver is loaded: a CUDA build,no NVIDIA driver: the CPU build) ($(TORCH)); override with TORCH=..."
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q '$(TORCH)' || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# libjpeg-turbo's TurboJPEG library, which PyTurboJPEG loads at run time.
sysdeps:
	@ldconfig -p | grep -q libturbojpeg || { \
	  echo "installing libturbojpeg0 (the TurboJPEG library PyTurboJPEG loads)"; \
	  $(ASROOT) apt-get update -qq && $(ASROOT) apt-get install -y -qq libturbojpeg0 >/dev/null; } || { \
	  echo "alexnetd needs the TurboJPEG library: install libturbojpeg0 (Debian/Ubuntu) as root"; exit 1; }

# A real Prometheus (promtool) and docker-compose for the deploy tests; the tests
# skip with a reason where these cannot be installed.
testdeps:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  $(ASROOT) apt-get update -qq && $(ASROOT) apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; } || \
	  echo "note: prometheus/docker-compose not installed; their tests will be skipped"

clean:
	rm -rf $(VENV) $(DEMO_RUN) build *.egg-info
