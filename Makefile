# `make demo` and `make test` create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_DATA_DISABLE_PROGRESS_BARS := 1
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .vkd mlruns mlflow.db
