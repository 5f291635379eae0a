# `make demo` and `make test` set up a virtual environment on first use, then run. They install
# the exact versions of constraints.txt (the lock), so a fresh machine gets what was tested.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
STAMP := $(VENV)/.kairos-installed
EXTRAS := test,bench
# Without CUDA, torch comes from this spec (a CPU build on the reference machines). Elsewhere:
#   make TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu" test
TORCH_CPU ?= torch==2.13.0
# `make test-latest` and `make lock`: the torch they install (the newest release is a multi-GB
# CUDA build; TORCH_LATEST=torch asks for it).
TORCH_LATEST ?= $(TORCH_CPU)
LATEST ?= .venv-latest

.PHONY: demo test lint test-latest lock clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# A torch installed outside the venv (a CUDA build on a GPU machine, say) is left alone,
	@# with the triton and CUDA libraries that match it; everything else comes from the lock.
	@torch_at=$$($(BIN)/python -c "import sys, torch; print('venv' if torch.__file__.startswith(sys.prefix) else 'system')" 2>/dev/null); \
	if [ "$$torch_at" = system ]; then \
		grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' $(LOCK) > $(VENV)/constraints.txt; \
	else \
		cp $(LOCK) $(VENV)/constraints.txt; \
		if [ -z "$$torch_at" ] && command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -c $(VENV)/constraints.txt torch; \
		elif [ -z "$$torch_at" ]; then $(BIN)/pip install -c $(VENV)/constraints.txt $(TORCH_CPU); fi; \
	fi
	$(BIN)/pip install -c $(VENV)/constraints.txt setuptools
	$(BIN)/pip install -c $(VENV)/constraints.txt --no-build-isolation -e '.[$(EXTRAS)]'
	@touch $(STAMP)

DEMO_ADDR ?= tcp://127.0.0.1:7199
DEMO_HTTP ?= http://127.0.0.1:8199
# A chat request with its own SLOs (the body's extension fields).
DEMO_CHAT := {"model": "tiny", "max_tokens": 24, "temperature": 0, "ttft_slo_ms": 500, "tpot_slo_ms": 50, \
	"messages": [{"role": "user", "content": "The quick brown fox"}]}

demo: $(STAMP)
	$(BIN)/kairos generate --model tiny --temperature 0.8 --seed 7 --max-tokens 48 \
		--prompt "The quick brown fox" --prompt "Once upon a time" --prompt "def add(a, b):"
	@echo; echo "=== the same model served disaggregated under the Kairos policies: kairos serve, a streaming client, then a trace replayed"
	@$(BIN)/kairos serve --port $(lastword $(subst :, ,$(DEMO_ADDR))) --http-port $(lastword $(subst :, ,$(DEMO_HTTP))) \
		--prefill-policy kairos --decode-policy kairos & serve=$$!; \
	$(BIN)/kairos status --addr $(DEMO_ADDR) --wait 120 > /dev/null && \
	$(BIN)/kairos client --addr $(DEMO_ADDR) --timeout 120 --temperature 0 --max-tokens 32 "The quick brown fox" && \
	echo && echo "--- the OpenAI-compatible HTTP API: a chat completion with curl, with this request's SLOs" && \
	curl -sS --fail-with-body --retry 20 --retry-connrefused --retry-delay 1 $(DEMO_HTTP)/v1/chat/completions \
		-H 'Content-Type: application/json' -d '$(DEMO_CHAT)' && \
	echo && echo "--- 60 requests of the Azure conversation trace, open loop, against TTFT 1 s and TPOT 100 ms" && \
	$(BIN)/kairos bench replay --addr $(DEMO_ADDR) --limit 60 --rate-scale 2 --max-prompt-len 256 --max-output-len 16; \
	code=$$?; echo; $(BIN)/kairos status --addr $(DEMO_ADDR); kill $$serve; wait $$serve; exit $$code
	@echo; echo "=== the policies against FCFS prefill and continuous batching, simulated on the whole Azure"
	@echo "    conversation trace: Llama-3.1-8B on one H200 per worker (measured profile), TTFT 1 s, TPOT 100 ms"
	$(BIN)/kairos bench compare --rate-scales 3,4.5,5.5,7 --policies fcfs+cb,kairos+kairos,mh+kairos \
		--out-dir build/demo --name compare_conv

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest's own script, not `python -m pytest`: that puts the checkout on sys.path, where its
# folders would shadow packages of the same name.
test: lint
	$(BIN)/pytest -q

# The suite against the newest versions pyproject.toml allows, in a venv of their own (not in
# CI): drift shows up here before a refreshed lock, or a user's own install, meets it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --upgrade pip setuptools $(TORCH_LATEST)
	$(LATEST)/bin/pip install -e '.[$(EXTRAS)]'
	$(LATEST)/bin/pip freeze --all --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/pytest -q

# Refreshes the lock from a fresh resolution of the newest allowed versions; then `make test`
# (which reinstalls from it) checks them, and the lock is committed with what it changed. Local
# version labels go (torch's +cpu): the same release is then a CPU or a CUDA build as needed.
lock:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --upgrade pip setuptools $(TORCH_LATEST)
	$(LATEST)/bin/pip install -e '.[$(EXTRAS)]'
	{ echo "# The lock: exact versions that make demo, make test and CI install (pip -c), resolved by"; \
	  echo "# 'make lock' on CPython $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())') on $$(date -u +%F)."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable | grep -v -E '^pip==' | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; \
	} > $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
