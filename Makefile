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

demo: $(STAMP)
	$(PY) -m fused_resnet.demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build fused_resnet/_C*.so *.egg-info
