# `make demo` and `make test` do all the set-up themselves: a virtual environment in .venv,
# the package and its test extras, then the job. Needs only Python 3.11+ on the PATH.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo
# The demo runs on a simulated clock: five weeks from a Monday in March 2027, across the
# switch to summer time (28 March) and Easter Monday (29 March, a French holiday).
DEMO_START ?= 2027-03-15T07:00:00Z
DEMO_WEEKS ?= 5
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Relance needs Python 3.11 or newer on the PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/relance init $(DEMO_DIR)
	cd $(DEMO_DIR) && export PREFECT_HOME="$$PWD/.prefect" RELANCE_NOW=$(DEMO_START) && \
	  $(BIN)/relance validate && \
	  $(BIN)/relance import prospects/sample.csv && \
	  $(BIN)/relance enroll cfo-outbound-fr --where language=fr && \
	  $(BIN)/relance enroll saas-outbound-en --where language=en && \
	  $(BIN)/relance simulate --weeks $(DEMO_WEEKS) && \
	  $(BIN)/relance status && \
	  $(BIN)/relance report

test: $(STAMP)
	mkdir -p .pytest_cache/prefect
	PREFECT_HOME="$$PWD/.pytest_cache/prefect" $(BIN)/python -m pytest
	$(BIN)/lint-imports

# Benchmarks of issue 3 (10 to 20 minutes; BENCH_ARGS=--quick for about 3): rewrites bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache *.egg-info
