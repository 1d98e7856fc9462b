# Two commands on a fresh machine with only Python >= 3.11 and pip:
#   make demo   - create .venv, install, run the pipeline on a synthetic dataset
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.chunkglm-installed
DEMO_OUT  ?= demo_output
DEMO_SIZE ?= small
DEMO_SUBJECTS ?= 6
PYTEST_ARGS ?=
# test files run in parallel processes (pytest-xdist): most tests wait on worker processes,
# servers and schedulers, so 2 processes on 2 cores halve the wall time
PYTEST_WORKERS ?= 2
# NiMARE 0.22 (the IBMA anchor) needs nilearn < 0.14: it gets its own venv, used by the
# IBMA parity tests and benchmarks through a subprocess (never imported into .venv).
NIMARE_VENV  := .venv-nimare
NIMARE_STAMP := $(NIMARE_VENV)/.nimare-installed
# fitlins 0.11 (the BIDS Stats Models anchor) needs nilearn 0.9 and pybids 0.15 (numpy < 2):
# its own venv too, run by the parity tests through a subprocess (tests/_fitlins_reference.py).
FITLINS_VENV  := .venv-fitlins
FITLINS_STAMP := $(FITLINS_VENV)/.fitlins-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# NiMARE's own test modules run there against chunkglm (tests/peer/): chunkglm and pytest are
# installed beside NiMARE, and the test images NiMARE's wheel leaves out are unpacked from
# ../shared/peer-data/ when that folder exists (without it those tests skip, saying why).
PEER_DATA := ../shared/peer-data/nimare_test_pain_dataset.tar.gz

$(NIMARE_STAMP): requirements/nimare-reference.txt pyproject.toml
	@test -x $(NIMARE_VENV)/bin/python || $(PYTHON) -m venv $(NIMARE_VENV)
	$(NIMARE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NIMARE_VENV)/bin/python -m pip install --quiet -r requirements/nimare-reference.txt
	$(NIMARE_VENV)/bin/python -m pip install --quiet -e . 'pytest>=8,<10' 'pytest-timeout>=2.2' 'pytest-xdist>=3.5,<4'
	@if [ -f $(PEER_DATA) ]; then \
	  tar xzf $(PEER_DATA) -C "$$($(NIMARE_VENV)/bin/python -c 'import nimare, os; print(os.path.dirname(nimare.__file__))')/tests/data"; \
	else echo "$(PEER_DATA) not found: NiMARE's image-based tests will skip"; fi
	@touch $(NIMARE_STAMP)

$(FITLINS_STAMP): requirements/fitlins-reference.txt
	@test -x $(FITLINS_VENV)/bin/python || $(PYTHON) -m venv $(FITLINS_VENV)
	$(FITLINS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FITLINS_VENV)/bin/python -m pip install --quiet -r requirements/fitlins-reference.txt
	@touch $(FITLINS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/chunkglm demo -o $(DEMO_OUT) --size $(DEMO_SIZE) --subjects $(DEMO_SUBJECTS)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(STAMP) $(NIMARE_STAMP) $(FITLINS_STAMP)
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(STAMP) $(NIMARE_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache benchmarks/.data
