#!/usr/bin/env bash
# Every GPU target of the decode-speed work, measured in one run on one H100/H200 (10 to 15
# minutes), on the Llama-3.1-8B shape with dummy weights:
#   tests       CUDA graphs against eager decode, overlapped steps against serial ones, and
#               with no synchronizing call between them; the decode kernel and the fused RoPE
#               and KV store in bf16; the sampler's top-k/top-p cutoff kernel as compiled; the
#               skinny matmuls in bf16
#   decode      decode step at batch 1, 32, 128 against the memory floor, overlapped and one at a
#               time, greedy and sampling; an 8k-token prefill step against the matmul ceiling;
#               transformers generate (static cache) at batch 1; where each step's GPU time goes,
#               by kind of kernel, and idle
#   kernels     decode and prefill attention against copy bandwidth, SDPA flash and FlashInfer;
#               the sampler's top-k/top-p cutoff against the sort it replaces;
#               decode at the decode batches and at long contexts over tiles (pipelined or
#               not) and split counts, prefill over tiles; each kernel's registers, copies in
#               flight and programs per SM under this machine's Triton
#   matmul      the skinny matmul against cuBLAS (the engine's matmul) at a decode step's
#               projections and batches 1 to 128, over tiles; the MLP's activation fused into
#               the down projection, and the blocks' norms into q/k/v and gate/up, against the
#               two launches the engine makes for each; then decode steps
#               at batch 1 and 32 with the skinny matmul taking them (--skinny-matmul-tokens 32),
#               against the floor and by kind of kernel, beside the decode part's cuBLAS steps
#   profile     the step-time profile on the fast loop (bench/profiles/Llama-3.1-8B_<gpu>.json)
#   throughput  trace-shaped offline throughput against transformers in the same run
#   serve_loop  the serving loop's share of a decode step under kairos serve (1P1D on the GPU)
#   handoff     the prefill worker's KV handoff on the GPU: offers as the step starts, answers
#               served while it runs (CUDA events), every early end cancelling its offer
#   fidelity    the simulator against live 1P1D on the GPU (CUDA IPC), one run per policy at two
#               loads, with the workers' step logs: the first GPU data for the co-located
#               contention fit and the warm-up that should leave no first-use stall
#   flashinfer  where FlashInfer imports: the flashinfer backend's tests, and its decode steps at
#               batch 1, 32, 128 (FlashInfer compiles its kernels on first use: minutes). Offline,
#               flashinfer-python 0.5.3 installs from two wheels of about 10 MB: its own (CUDA
#               sources, built with nvcc on first use) and apache-tvm-ffi; it imports with those
#               where einops, ninja, nvidia-ml-py and tabulate are installed
#
#   bench/gpu_all.sh [LOGDIR]                   # from the checkout's root, kairos installed
#   PARTS="kernels flashinfer" bench/gpu_all.sh # only the parts named
#
# Each part runs under its own time limit, and a part that fails leaves the rest to run. The
# logs go to LOGDIR (default bench/results/gpu_logs), the JSON to bench/results/. `python -P`
# keeps the checkout off sys.path (its `kernels` folder would hide the package transformers
# imports under that name).
set -u
LOGDIR=${1:-bench/results/gpu_logs}
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1
PY="python3 -P"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')  # H100, H200
MODEL=bench/models/Llama-3.1-8B

part() {  # part NAME SECONDS COMMAND...: runs it, logs it, keeps going whatever it returns
    local name=$1 limit=$2
    shift 2
    [[ " ${PARTS:-$name} " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
    local rc=$?
    grep -v 'it/s\]\|s/it\]' "$LOGDIR/$name.log" | tail -25
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

part tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_step_inputs.py tests/test_kernels_attention.py \
    tests/test_kernels_small.py tests/test_sampler.py tests/test_overlap.py tests/test_kernels_sampling.py \
    tests/test_kernels_linear.py -k "cuda_graph or larger_than or (decode and dtype2) or merges_splits \
    or (rope and dtype2) or on_cuda or kernels_sampling or (kernels_linear and dtype2)"
part decode 240 $PY -m kairos.bench.decode_throughput --model $MODEL --batch-sizes 1,32,128 --context 1024 \
    --prefill-tokens 8192 --gpu-memory-utilization 0.5 --serial-too --sampled-too --breakdown --hf-peers static --hf-batch-sizes 1
part kernels 180 bash -c "$PY -m kairos.bench.kernels && $PY -m kairos.bench.kernel_resources"
part matmul 240 bash -c "$PY -m kairos.bench.matmul && $PY -m kairos.bench.decode_throughput --model $MODEL \
    --batch-sizes 1,32 --context 1024 --gpu-memory-utilization 0.5 --skinny-matmul-tokens 32 --breakdown"
part profile 120 $PY -m kairos.cli profile --model $MODEL --load-format dummy --max-model-len 4096 \
    --out "bench/profiles/Llama-3.1-8B_${GPU}.json"
part throughput 300 $PY -m kairos.bench.throughput --model $MODEL --requests 256 --batch-sizes 64,256 \
    --peers static,continuous --peer-batch-sizes 32 --peer-seconds 30 --continuous-requests 64
part serve_loop 120 $PY -m kairos.bench.serve_loop --model $MODEL --load-format dummy --gpu-memory-utilization 0.42 \
    --requests 200
part handoff 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_handoff.py
part fidelity 300 $PY -m kairos.bench.sim_fidelity --model $MODEL --load-format dummy \
    --profile "bench/profiles/Llama-3.1-8B_${GPU}.json" --max-model-len 8192 --requests 150 --max-prompt-len 4096 \
    --max-output-len 64 --ttft-slo-ms 250 --tpot-slo-ms 50 --token-budget 8192 --max-batch 256 --kv-blocks 4096 \
    --kv-bandwidth-gb-s 100 --warm-up 8 --rate-scales 6,12 --repeats 1 --step-logs "$LOGDIR/steplogs" \
    --name "sim_fidelity_Llama-3.1-8B_${GPU}_colocated"
if $PY -c "import flashinfer" 2>/dev/null; then
    part flashinfer 300 bash -c "$PY -m pytest -q -x -p no:cacheprovider tests/test_flashinfer.py && \
        $PY -m kairos.bench.decode_throughput --model $MODEL --backend flashinfer --batch-sizes 1,32,128 \
        --context 1024 --gpu-memory-utilization 0.5"
fi
