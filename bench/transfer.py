"""KV transfer between a prefill and a decode worker: throughput and the latency it adds to a
request, against the two ceilings it runs through, measured in the same run.

The transfer path is the workers' own code (`OutgoingKV` gathers a request's blocks into host
memory, ZeroMQ carries the frames zero-copy over TCP, `KVWriter` writes them into reserved
blocks), with the decode side in a second thread and an ack back per transfer. The ceilings:
  - the pinned host copy: GPU<->pinned host on a GPU, a host memcpy on a CPU;
  - ZeroMQ loopback: the same frames over the same socket pair, with no gather or write.
The ratio that matters is KV throughput over the slower ceiling (target on GPU: >= 0.7).

    python -m kairos.bench.transfer                   # Llama-3.1-8B KV geometry, bf16
    python -m kairos.bench.transfer --tokens 16,256,1024 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from types import SimpleNamespace

import torch
import zmq
from tqdm import tqdm

from kairos.bench import shipped
from kairos.bench.common import device_name, synchronize, write_result
from kairos.engine.config import DTYPES, ModelConfig
from kairos.scheduler.defaults import BLOCK_SIZE
from kairos.transport import protocol as p
from kairos.transport.kv import DEFAULT_FRAME_BYTES, KVWriter, OutgoingKV, blocks_per_frame, kv_geometry
from kairos.transport.sockets import make_socket

MODELS = shipped("models")


def kv_runner(model: str, dtype: torch.dtype, device: torch.device, num_blocks: int, block_size: int = BLOCK_SIZE):
    """The parts of a ModelRunner a transfer touches: a KV cache of the model's geometry."""
    cfg = ModelConfig.from_pretrained(MODELS / model)
    cache = torch.empty((2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
                        dtype=dtype, device=device)
    cache.view(torch.uint8).random_()
    return SimpleNamespace(model_config=cfg, dtype=dtype, device=device, block_size=block_size, kv_cache=cache)


def pinned_copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of the host leg: on a GPU the slower of GPU -> pinned host and pinned host -> GPU
    (a transfer pays one on each side); on a CPU a host memcpy."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()

    def best_seconds(dst, src) -> float:
        best = float("inf")
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    seconds = max(best_seconds(host, gpu), best_seconds(gpu, host)) if pin else best_seconds(host, gpu)
    return nbytes / seconds


def socket_pair(ctx: zmq.Context, max_frame: int):
    receiver = make_socket(ctx, zmq.ROUTER, max_bytes=max(max_frame, p.MAX_CONTROL_MESSAGE_BYTES))
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    sender = make_socket(ctx, zmq.DEALER, identity=b"prefill")
    sender.connect(f"tcp://127.0.0.1:{port}")
    return sender, receiver


def zmq_loopback_bandwidth(frames: list, repeats: int = 5) -> float:
    """Bytes/s of sending these frames (zero-copy) and getting a one-frame ack back."""
    nbytes = sum(len(f) for f in frames)
    ctx = zmq.Context()
    sender, receiver = socket_pair(ctx, max(len(f) for f in frames))

    def echo():
        for _ in range(repeats + 1):
            parts = receiver.recv_multipart(copy=False)
            receiver.send_multipart([parts[0].bytes, b"ack"])

    thread = threading.Thread(target=echo)
    thread.start()
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        sender.send_multipart([b"header", *frames], copy=False)
        sender.recv()
        best = min(best, time.perf_counter() - start)
    thread.join()
    ctx.destroy(linger=0)
    return nbytes / best


def kv_transfer_latency(src, dst, tokens: int, max_frame: int, repeats: int = 5) -> float:
    """Seconds from the start of the gather on the prefill side to the ack of the written
    blocks on the decode side, best of `repeats`."""
    num_blocks = -(-tokens // src.block_size)
    geometry = kv_geometry(src)
    per_frame = blocks_per_frame(geometry, max_frame)
    writer = KVWriter(dst, max_frame)
    stream = torch.cuda.Stream() if src.device.type == "cuda" else None
    ctx = zmq.Context()
    sender, receiver = socket_pair(ctx, max_frame)
    src_ids = list(range(num_blocks))
    dst_ids = list(range(num_blocks, 2 * num_blocks))

    def decode_side():
        for _ in range(repeats + 1):
            parts = receiver.recv_multipart(copy=False)
            header = p.decode(parts[1].buffer)
            frames = parts[2:]
            problem = writer.check(frames, num_blocks, header.blocks_per_frame)
            assert problem is None, problem
            writer.write(frames, dst_ids, header.blocks_per_frame)
            receiver.send_multipart([parts[0].bytes, p.encode(p.KVAck(header.transfer_id))])

    thread = threading.Thread(target=decode_side)
    thread.start()
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(src.device)
        start = time.perf_counter()
        out = OutgoingKV(src, src_ids, stream)
        out.wait()
        sender.send_multipart([p.encode(p.KVData(str(i), per_frame, 0)), *out.frames(per_frame)], copy=False)
        sender.recv()
        best = min(best, time.perf_counter() - start)
    thread.join()
    ctx.destroy(linger=0)
    # Compared as bytes: random bits include NaN patterns, which never equal themselves.
    assert torch.equal(dst.kv_cache[:, :, dst_ids].view(torch.uint8), src.kv_cache[:, :, src_ids].view(torch.uint8)), \
        "KV corrupted in transit"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-3.1-8B", help=f"a folder of {MODELS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--tokens", help="comma-separated prompt lengths (default: up to 32k on GPU, 4k on CPU)")
    parser.add_argument("--frame-mb", type=float, default=DEFAULT_FRAME_BYTES / 2**20)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        [16, 256, 1024, 4096, 16384, 32768] if device.type == "cuda" else [16, 256, 1024, 4096])
    max_frame = int(args.frame_mb * 2**20)
    blocks = -(-max(tokens) // BLOCK_SIZE)
    src = kv_runner(args.model, dtype, device, blocks)
    dst = kv_runner(args.model, dtype, device, 2 * blocks)
    bytes_per_token = kv_geometry(src).bytes_per_block_layer * 2 * src.model_config.num_layers // BLOCK_SIZE

    largest = OutgoingKV(src, list(range(blocks)), None if device.type == "cpu" else torch.cuda.Stream())
    largest.wait()
    frames = largest.frames(blocks_per_frame(kv_geometry(src), max_frame))
    pinned = pinned_copy_bandwidth(device, largest.nbytes)
    loopback = zmq_loopback_bandwidth(frames)
    del frames, largest
    ceiling = min(pinned, loopback)
    print(f"{device_name(device)}: {args.model} KV, {bytes_per_token / 1024:.0f} KiB/token, "
          f"frames of {args.frame_mb:g} MiB")
    print(f"ceilings: pinned host copy {pinned / 1e9:.2f} GB/s, ZeroMQ loopback {loopback / 1e9:.2f} GB/s")
    rows = []
    for n in tqdm(tokens, desc="transfer", unit="size", disable=not sys.stderr.isatty()):
        seconds = kv_transfer_latency(src, dst, n, max_frame)
        nbytes = -(-n // BLOCK_SIZE) * BLOCK_SIZE * bytes_per_token
        rows.append({"tokens": n, "bytes": nbytes, "latency_ms": seconds * 1e3, "gb_s": nbytes / seconds / 1e9,
                     "fraction_of_ceiling": nbytes / seconds / ceiling})
    print(f"{'tokens':>8} {'MiB':>9} {'latency ms':>11} {'GB/s':>7} {'of ceiling':>10}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['bytes'] / 2**20:>9.1f} {r['latency_ms']:>11.2f} {r['gb_s']:>7.2f} "
              f"{r['fraction_of_ceiling']:>10.2f}")
    path = write_result(f"transfer_{args.model}_{device.type}", {
        "device": device_name(device), "model": args.model, "dtype": args.dtype, "frame_bytes": max_frame,
        "pinned_copy_gb_s": pinned / 1e9, "zmq_loopback_gb_s": loopback / 1e9, "ceiling_gb_s": ceiling / 1e9,
        "transfers": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
