# tpa_jax: `make demo` runs the main job, `make test` the test suite. Both create and use a local
# virtual environment (.venv) and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# The study's workdir and variant (configs/study.py:VARIANT; '' is the default comparison).
STUDY_WORKDIR ?= runs/study
VARIANT ?=
# Test processes in parallel (each simulates 4 CPU devices).
TEST_WORKERS ?= 2

.PHONY: demo study test bench install clean real-data

# uv installs the same packages from PyPI in about a quarter of pip's time (measured here: 22 s
# against ~100 s for this step), which counts against `make demo`'s time.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.9
	$(PY) -m uv pip install --quiet --python $(PY) -e '.[test,speech,serve]'
	touch $@

# The parity tests' reference implementations (torch, transformers): the tests need them, the
# demo does not, so `make demo` does not spend its time budget installing them. pip, not uv:
# torch's CPU build comes from the wheels pip's configuration points to (any other build pulls
# gigabytes of CUDA packages).
$(VENV)/.installed-parity: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,speech,serve,parity]'
	touch $@

install: $(VENV)/.installed-parity

demo: $(VENV)/.installed
	$(PY) launch/demo.py --config=configs/demo.py --workdir=$(WORKDIR)

# The paper's study over the demo's base (pre-trained once and cached, or reused from
# $(WORKDIR) when `make demo` has run): `make study VARIANT=quick` for a first look.
study: $(VENV)/.installed
	$(PY) launch/study.py --config=configs/study.py$(if $(VARIANT),:$(VARIANT)) \
		--workdir=$(STUDY_WORKDIR)$(if $(VARIANT),-$(VARIANT)) --config.study.base_workdir=$(WORKDIR)

# The real-speech task (configs/study.py:real): Debian's Asterisk prompts (CC-BY-SA-3.0), installed
# with apt where missing (as root), and their manifest with its fixed split.
REAL_DATA ?= runs/real_data/asterisk
real-data: $(VENV)/.installed
	@if [ ! -d /usr/share/asterisk/sounds/en ] || \
	    [ ! -f /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q asterisk-core-sounds-en-wav \
	      asterisk-core-sounds-en; fi
	$(PY) launch/manifest.py --layout=asterisk --output=$(REAL_DATA)

# The import contract (.importlinter: tpa_jax's packages as floors, imports only downwards), then
# the tests.
test: $(VENV)/.installed-parity
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: $(VENV)/.installed
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) runs
