# `make demo` and `make test` set up a virtual environment on first use, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kairos-installed
# Without CUDA, torch comes from this spec (a CPU build on the reference machines). Elsewhere:
#   make TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu" test
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# An existing torch (a CUDA build on a GPU machine, say) is left alone.
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; \
		else $(BIN)/pip install $(TORCH_CPU); fi; \
	fi
	$(BIN)/pip install -e '.[test,bench]'
	@touch $(STAMP)

DEMO_ADDR ?= tcp://127.0.0.1:7199

demo: $(STAMP)
	$(BIN)/kairos generate --model tiny --temperature 0.8 --seed 7 --max-tokens 48 \
		--prompt "The quick brown fox" --prompt "Once upon a time" --prompt "def add(a, b):"
	@echo; echo "=== the same model served disaggregated under the Kairos policies: kairos serve, a streaming client, then a trace replayed"
	@$(BIN)/kairos serve --port $(lastword $(subst :, ,$(DEMO_ADDR))) --prefill-policy kairos --decode-policy kairos & serve=$$!; \
	$(BIN)/kairos status --addr $(DEMO_ADDR) --wait 120 > /dev/null && \
	$(BIN)/kairos client --addr $(DEMO_ADDR) --timeout 120 --temperature 0 --max-tokens 32 "The quick brown fox" && \
	echo && echo "--- 60 requests of the Azure conversation trace, open loop, against TTFT 1 s and TPOT 100 ms" && \
	$(BIN)/kairos bench replay --addr $(DEMO_ADDR) --limit 60 --rate-scale 2 --max-prompt-len 256 --max-output-len 16; \
	code=$$?; echo; $(BIN)/kairos status --addr $(DEMO_ADDR); kill $$serve; wait $$serve; exit $$code
	@echo; echo "=== the policies against FCFS prefill and continuous batching, simulated on the whole Azure"
	@echo "    conversation trace: Llama-3.1-8B on one H100 per worker (measured profile), TTFT 1 s, TPOT 100 ms"
	$(BIN)/kairos bench compare --rate-scales 3,4.5,5.5,7 --policies fcfs+cb,kairos+kairos,mh+kairos \
		--out-dir build/demo --name compare_conv

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
