# Two commands do all set-up on a fresh machine:
#   make demo   the tiny LLaMA-3 SFT run through the upstream-compatible script, under the shim
#   make test   the test suite on the three library stacks, each in its own virtual environment
PYTHON ?= python3
VENV := .venv
STACKS := upstream requirements current
DEMO_STACK ?= current
PYTEST_ARGS ?=

.PHONY: demo test bench $(STACKS:%=test-%) clean

demo: $(VENV)/$(DEMO_STACK)/.installed
	$(VENV)/$(DEMO_STACK)/bin/python examples/demo.py

test: $(STACKS:%=test-%)

# pytest exits 5 when it collects nothing; that must fail too, so no special case here.
$(STACKS:%=test-%): test-%: $(VENV)/%/.installed
	@echo "=== stack: $* ==="
	$(VENV)/$*/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(VENV)/$(DEMO_STACK)/.installed
	$(VENV)/$(DEMO_STACK)/bin/python benchmarks/run.py

# torch is pinned in every stack file: pip then takes the CPU build from local disk instead of downloading CUDA.
$(VENV)/%/.installed: stacks/%.txt stacks/test.txt pyproject.toml setup.py
	rm -rf $(VENV)/$*
	$(PYTHON) -m venv $(VENV)/$*
	$(VENV)/$*/bin/pip install -q --disable-pip-version-check -r stacks/$*.txt
	$(VENV)/$*/bin/pip install -q --disable-pip-version-check -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
