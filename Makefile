# Two commands do all set-up on a fresh machine:
#   make demo   the tiny LLaMA-3 SFT run through the upstream-compatible script, under the shim
#   make test   the test suite on the three library stacks, each in its own virtual environment, and the install
#               test on the previous generation's stack
PYTHON ?= python3
VENV := .venv
STACKS := upstream requirements current
DEMO_STACK ?= current
PYTEST_ARGS ?=

.PHONY: demo test bench evidence $(STACKS:%=test-%) test-previous clean

demo: $(VENV)/$(DEMO_STACK)/.installed
	$(VENV)/$(DEMO_STACK)/bin/python examples/demo.py

test: $(STACKS:%=test-%) test-previous

# pytest exits 5 when it collects nothing; that must fail too, so no special case here.
$(STACKS:%=test-%): test-%: $(VENV)/%/.installed
	@echo "=== stack: $* ==="
	$(VENV)/$*/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The previous generation's pins (stacks/previous.txt, below the tested ranges) installed first, as a recipe's
# environment has them, without mps-shim; tests/test_install_previous.py, run from the current stack, installs
# mps-shim into it with pip and checks nothing of the stack moved. Only that file runs here.
test-previous: $(VENV)/previous/.pinned $(VENV)/current/.installed
	@echo "=== stack: previous ==="
	PREVIOUS_STACK_PYTHON=$(CURDIR)/$(VENV)/previous/bin/python \
		$(VENV)/current/bin/python -m pytest -q -p no:cacheprovider tests/test_install_previous.py

$(VENV)/previous/.pinned: stacks/previous.txt
	rm -rf $(VENV)/previous
	$(PYTHON) -m venv $(VENV)/previous
	$(VENV)/previous/bin/pip install -q --disable-pip-version-check -r stacks/previous.txt
	touch $@

bench: $(VENV)/$(DEMO_STACK)/.installed
	$(VENV)/$(DEMO_STACK)/bin/python benchmarks/run.py

# evidence/torch-macos.json from torch's macOS arm64 wheels (about a gigabyte of downloads, cached in out/evidence-wheels/).
evidence:
	$(PYTHON) evidence/extract.py
	$(PYTHON) evidence/fallback_ops.py  # shim/cpu_fallback_ops.py from the same wheels (needs PyYAML)

# torch is pinned in every stack file: pip then takes the CPU build from local disk instead of downloading CUDA.
$(VENV)/%/.installed: stacks/%.txt stacks/test.txt pyproject.toml setup.py
	rm -rf $(VENV)/$*
	$(PYTHON) -m venv $(VENV)/$*
	$(VENV)/$*/bin/pip install -q --disable-pip-version-check -r stacks/$*.txt
	$(VENV)/$*/bin/pip install -q --disable-pip-version-check -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
