"""Settings that the engine, the workers, the router and the simulator share, each given here
once: the live system and its simulated model start from the same numbers."""

DEFAULT_TTFT_SLO_MS = 1000.0  # a request's time-to-first-token target, when it sets none
DEFAULT_TPOT_SLO_MS = 100.0  # its time-per-output-token target
BLOCK_SIZE = 16  # tokens per KV block
TOKEN_BUDGET = 8192  # prompt tokens per prefill step
MAX_BATCH = 256  # sequences per decode step
# KV under way into one decode worker, at most (one transfer can always go): enough for the
# transfers that several prefill workers clear in one step each (a 1000-token Llama-3-8B prompt
# is 128 MiB), and a bound on the host memory received KV takes before it is written.
MAX_INFLIGHT_TRANSFER_BYTES = 4 * 2**30
# The longest prompt the router takes: tokenizing a million characters holds a worker about a
# second; four million held one past the router's liveness timeout.
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKENS = 1_000_000
