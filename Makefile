# The README's commands: `make demo` (set up, then the main job) and `make test` (set up,
# then the test suite), on the pinned newest versions (requirements.txt, in .venv);
# `make test-oldest` runs the suite on the oldest supported ones (requirements-oldest.txt,
# in .venv-oldest). Each creates its venv on first use and rebuilds the extension when its
# sources change.
PYTHON ?= python3
SHELL := bash

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The extension builds in place (fused_resnet/_C*.so) against one torch, so the oldest
# leg installs and tests its own copy of the tracked sources.
OLDEST_VENV := $(abspath .venv-oldest)
OLDEST_TREE := build/oldest-tree
OLDEST_STAMP := $(OLDEST_VENV)/.installed

.PHONY: demo test test-oldest oldest-tree clean

define setup
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -r $(2)
	cd $(3) && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} \
	    $(1)/bin/python -m pip install --no-build-isolation --no-deps -e .
	touch $(1)/.installed
endef

$(STAMP): requirements.txt requirements-common.txt pyproject.toml setup.py $(wildcard csrc/*)
	$(call setup,$(VENV),requirements.txt,.)

# On a GPU the main job is the throughput benchmark; without one, the CPU demo.
demo: $(STAMP)
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    $(PY) -m fused_resnet.bench; else $(PY) -m fused_resnet.demo; fi

test: $(STAMP)
	$(PY) -m pytest

# A copy of the tracked files, with files since deleted from the checkout removed (the
# extension's build outputs stay, so that it rebuilds only when its sources change).
oldest-tree:
	mkdir -p $(OLDEST_TREE)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(OLDEST_TREE)
	cd $(OLDEST_TREE) && comm -23 \
	    <(find . -type f ! -name '*.so' ! -path './build/*' ! -path '*/__pycache__/*' \
	        ! -path '*.egg-info/*' ! -path './.*' | sed 's|^\./||' | sort) \
	    <(cd $(CURDIR) && git ls-files -co --exclude-standard | sort) | xargs -r rm -f

$(OLDEST_STAMP): requirements-oldest.txt requirements-common.txt pyproject.toml setup.py \
		$(wildcard csrc/*) | oldest-tree
	$(call setup,$(OLDEST_VENV),requirements-oldest.txt,$(OLDEST_TREE))

test-oldest: oldest-tree $(OLDEST_STAMP)
	cd $(OLDEST_TREE) && $(OLDEST_VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .venv-oldest build fused_resnet/_C*.so *.egg-info
