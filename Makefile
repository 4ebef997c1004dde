# The README's two commands: `make demo` (set up, then the main job) and `make test`
# (set up, then the test suite). Both create .venv on first use and rebuild the
# extension when its sources change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} \
	    $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# On a GPU the main job is the throughput benchmark; without one, the CPU demo.
demo: $(STAMP)
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    $(PY) -m fused_resnet.bench; else $(PY) -m fused_resnet.demo; fi

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build fused_resnet/_C*.so *.egg-info
