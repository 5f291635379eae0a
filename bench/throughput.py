"""End-to-end offline throughput on trace-shaped requests, with transformers in the same run.

N requests take their prompt and output lengths from a trace (the Azure conversation trace by
default; random prompt tokens, outputs run to their length). All arrive at once. Kairos serves
them with continuous batching at each batch cap of --batch-sizes; then, on the same requests,
transformers:
  - `generate` with a static cache, one batch at a time (prompts left-padded to the longest
    of all and every batch run to the longest output, so that it compiles once);
  - continuous batching (`generate_batch`, paged attention), where the installed version has it.
Reports output tokens/s, total (prompt + output) tokens/s, and TTFT and TPOT percentiles, and
writes bench/results/throughput_<model>_<device>.json and a PNG of tokens/s against batch size.

  python -P -m kairos.bench.throughput --model bench/models/Llama-3.1-8B --load-format dummy
  python -P -m kairos.bench.throughput --model tiny --requests 24 --batch-sizes 4,16   # CPU run

A peer that would run past --peer-seconds is stopped after the batch that crosses it, and its
rate is that of the batches it ran (said in its row). `generate_batch` cannot be stopped
part-way: --continuous-requests gives it the first N requests only (its row says how many).
`-P` keeps the checkout off sys.path, where its `kernels` folder would hide the `kernels`
package transformers imports.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kairos.bench import DEFAULT_TRACE
from kairos.bench.common import add_model_args, backend_suffix, device_name, device_tag, synchronize, write_result
from kairos.scheduler.metrics import percentiles, time_per_output_token
from kairos.scheduler.traces import load_azure


def trace_requests(args, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) of the first --requests requests of the trace, clipped
    to --max-prompt and --max-output."""
    rng = random.Random(0)
    trace = load_azure(args.trace)[: args.requests]
    return [([rng.randrange(vocab) for _ in range(min(r.prompt_len, args.max_prompt))],
             max(1, min(r.output_len, args.max_output))) for r in trace]


def summary(wall_s: float, prompt_tokens: int, output_tokens: int, ttfts: list[float], tpots: list[float]) -> dict:
    return {"wall_s": wall_s, "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / wall_s,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
            "ttft_ms": {k: v and v * 1e3 for k, v in percentiles(ttfts).items()},
            "tpot_ms": {k: v and v * 1e3 for k, v in percentiles(tpots).items()}}


def kairos_engine(args, requests, max_batch: int):
    from kairos.engine import LLM

    max_len = max(len(p) + n for p, n in requests) + 1
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device, max_model_len=max_len,
              max_num_seqs=max_batch, enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              backend=args.backend)
    llm.warm_up()
    return llm


def run_kairos(llm, requests, batch: int) -> dict:
    from kairos.engine import SamplingParams

    # One engine serves every cap (its CUDA graphs cover the largest): the cap is the scheduler's.
    llm.scheduler.max_num_seqs = batch
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    synchronize(llm.runner.device)
    start = time.perf_counter()
    seqs = [llm.add_request(p, sp) for (p, _), sp in zip(requests, params)]
    with tqdm(total=len(seqs), desc=f"kairos B<={batch}", unit="req") as bar:
        while llm.has_unfinished():
            bar.update(sum(s.is_finished for s in llm.step() or ()))
    wall = time.perf_counter() - start
    ttfts = [s.token_times[0] - s.arrival_time for s in seqs]
    tpots = [time_per_output_token(s.token_times[0], s.token_times[-1], len(s.token_times)) for s in seqs
             if len(s.token_times) > 1]
    row = {"engine": "kairos", "batch": batch, "cuda_graphs": llm.runner.graphs is not None,
           **summary(wall, sum(len(p) for p, _ in requests), sum(s.num_output_tokens for s in seqs), ttfts, tpots)}
    return row


def run_hf_static(hf, requests, batch: int, budget_s: float) -> dict:
    from kairos.bench.hf_peer import TokenClock, generate_kwargs

    device = hf.device
    width = max(len(p) for p, _ in requests)
    new_tokens = max(n for _, n in requests)
    ttfts, tpots, prompt_tokens, output_tokens, elapsed, done = [], [], 0, 0, 0.0, 0
    for first in tqdm(range(0, len(requests), batch), desc=f"transformers static B={batch}", unit="batch"):
        chunk = requests[first : first + batch]
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(chunk):  # left padding, as generate() expects
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        clock = TokenClock()
        if first == 0:  # compiles for this cache length (prompt + new tokens): not timed
            hf.generate(ids.to(device), attention_mask=mask.to(device), **generate_kwargs(new_tokens, "static"))
        synchronize(device)
        start = time.perf_counter()
        hf.generate(ids.to(device), attention_mask=mask.to(device), streamer=clock,
                    **generate_kwargs(new_tokens, "static"))
        synchronize(device)
        elapsed += time.perf_counter() - start
        done += len(chunk)
        # Each request's output is its first n tokens: what it wanted of the batch's run.
        for _, n in chunk:
            ttfts.append(clock.times[1] - start)
            if n > 1:
                tpots.append((clock.times[n] - clock.times[1]) / (n - 1))
        prompt_tokens += sum(len(p) for p, _ in chunk)
        output_tokens += sum(n for _, n in chunk)
        if elapsed > budget_s:
            break
    # Output tokens count what each request asked for; the batch generated more (every row runs
    # to the longest output), which is the rate its kernels ran at.
    return {"engine": "transformers generate, static cache", "batch": batch, "requests_run": done,
            "generated_tokens_per_s": done * new_tokens / elapsed,
            **summary(elapsed, prompt_tokens, output_tokens, ttfts, tpots)}


def run_hf_continuous(hf, requests, batch: int) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    synchronize(hf.device)
    start = time.perf_counter()
    outputs = hf.generate_batch([p for p, _ in requests], generation_config=config, progress_bar=True)
    synchronize(hf.device)
    wall = time.perf_counter() - start
    generated = [len(o.generated_tokens) for o in outputs.values()]
    return {"engine": "transformers generate_batch (continuous batching)", "batch": batch,
            "requests_run": len(requests),
            "note": "every request runs to the longest output (one max_new_tokens for all)",
            **summary(wall, sum(len(p) for p, _ in requests), sum(generated), [], [])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = sorted((r["batch"], r["output_tokens_per_s"]) for r in rows if r["engine"] == engine)
        ax.plot(*zip(*mine), marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (Kairos: most sequences per step)")
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-prompt", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--batch-sizes", default="16,64,256", help="Kairos' caps on sequences per step")
    ap.add_argument("--peer-batch-sizes", default="8,32", help="transformers static-cache batch sizes")
    ap.add_argument("--peers", default="static,continuous", help="transformers modes to run: static, continuous")
    ap.add_argument("--peer-seconds", type=float, default=60.0, help="time budget of each peer run")
    ap.add_argument("--continuous-requests", type=int, default=None,
                    help="the first N requests only for the continuous-batching peer (default: all)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="Kairos' share, leaving room for the peer in the same process")
    args = ap.parse_args()

    from kairos.engine.config import EngineConfig, ModelConfig
    from kairos.engine.llm import resolve_model_path

    model_config = ModelConfig.from_pretrained(resolve_model_path(args.model))
    requests = trace_requests(args, model_config.vocab_size)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = kairos_engine(args, requests, max(batch_sizes))
    rows = [run_kairos(llm, requests, b) for b in batch_sizes]
    del llm
    gc.collect()
    for row in rows:
        print(f"kairos B<={row['batch']:4d}: {row['output_tokens_per_s']:9.1f} output tok/s "
              f"{row['total_tokens_per_s']:9.1f} total tok/s  TTFT p50 {row['ttft_ms']['p50']:.0f} ms  "
              f"TPOT p50 {row['tpot_ms']['p50']:.1f} ms")
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device)
    device, dtype = torch.device(config.device), config.torch_dtype(model_config)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peers = [p for p in args.peers.split(",") if p]
    if peers:
        import transformers

        from kairos.bench.hf_peer import load_hf_model

        hf = load_hf_model(args.model, dtype, device)
        peer_rows = []
        if "static" in peers:
            peer_rows += [run_hf_static(hf, requests, int(b), args.peer_seconds)
                          for b in args.peer_batch_sizes.split(",")]
        if "continuous" in peers:
            if hasattr(hf, "generate_batch"):
                peer_rows.append(run_hf_continuous(hf, requests[: args.continuous_requests],
                                                   max(int(b) for b in args.batch_sizes.split(","))))
            else:
                print(f"transformers {transformers.__version__} has no generate_batch: no continuous-batching peer")
        for row in peer_rows:
            row["transformers"] = transformers.__version__
            print(f"{row['engine']} B={row['batch']}: {row['output_tokens_per_s']:9.1f} output tok/s")
        best_peer = max(peer_rows, key=lambda r: r["output_tokens_per_s"], default=None)
        best_ours = max(rows, key=lambda r: r["output_tokens_per_s"])
        rows += peer_rows
        if best_peer:
            ratio = best_ours["output_tokens_per_s"] / best_peer["output_tokens_per_s"]
            print(f"Kairos' best is {ratio:.2f}x the output tokens/s of transformers' best ({best_peer['engine']})")
    name = f"throughput_{Path(args.model).name}_{device_tag(device)}{backend_suffix(args)}"
    result = {"device": device_name(device), "model": Path(args.model).name, "trace": Path(args.trace).name,
              "requests": len(requests), "prompt_tokens": sum(len(p) for p, _ in requests),
              "results": rows}
    path = write_result(name, result)
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
