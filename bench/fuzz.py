"""Fuzzing a live cluster: malformed messages of every kind, on every socket, with real
requests in between whose outputs must equal the offline engine's.

  python -m kairos.bench.fuzz                       # 100,000 messages, tiny model, this CPU
  python -m kairos.bench.fuzz --messages 10000

A router, a prefill and a decode worker run as processes. Messages go to the router (as a
client would send them, and posing as a worker), and to the decode worker's KV socket (before
and after a handshake): random bytes, truncated msgpack, deep nesting, many and oversized
frames, every message type with fields of the right and wrong types (huge, negative and
non-finite numbers, long strings), missing and extra fields, wrong versions. Every
`--check-every` messages a greedy request must come back token for token as `LLM.generate`
gives it. The result: messages sent, processes that exited (target 0), wrong outputs (target
0) and each process's resident memory before and after, as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import typing

import msgpack
import zmq
from tqdm import tqdm

from kairos.bench.common import write_result
from kairos.bench.soak import rss_mb
from kairos.cli.engine_flags import engine_argv
from kairos.engine import LLM, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.client import Client
from kairos.transport.kv import kv_geometry
from kairos.transport.serve import ProcessGroup, local_cluster

EDGE = [0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -0.0, math.inf, -math.inf, math.nan, "", "x" * 10_000,
        None, True, [], {}, b"\x00" * 64]


class Fuzzer:
    def __init__(self, seed: int, geometry: dict):
        self.rng = random.Random(seed)
        self.geometry = geometry
        self.hints = {cls: typing.get_type_hints(cls) for cls in p.MESSAGE_TYPES.values()}

    def value(self, hint=None, depth: int = 0):
        """Of the hinted type most of the time (so that the message gets past decoding), else anything."""
        rng = self.rng
        if hint is not None and rng.random() < 0.8:
            origin = typing.get_origin(hint)
            if origin is list:
                return [self.value(typing.get_args(hint)[0], depth + 1) for _ in range(rng.randint(0, 40))]
            if hint is int:
                return rng.choice([rng.randint(-5, 600), *[e for e in EDGE if type(e) is int]])
            if hint is float:
                return rng.choice([rng.uniform(-1e3, 1e3), 1e308, math.nan, math.inf, 0])
            if hint is str:
                return rng.choice(["", "p1", "decode-x", "x" * rng.randint(1, 300), "\u00e9\u6f22"])
            if hint is dict:
                return {rng.choice(["max_tokens", "temperature", "top_k", "ttft_ms", "free_blocks", "zzz"]):
                        self.value(None, depth + 1) for _ in range(rng.randint(0, 4))}
        if depth < 3 and rng.random() < 0.2:
            return [self.value(None, depth + 1) for _ in range(rng.randint(0, 4))]
        return rng.choice(EDGE)

    def message(self) -> list[bytes]:
        """One multipart message, malformed in one of many ways (or not at all)."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.1:
            return [rng.randbytes(rng.randint(0, 300))]
        if kind < 0.15:
            depth = rng.randint(9, 5000)
            head = b"".join(msgpack.packb(x) for x in ("v", p.PROTOCOL_VERSION, "type", "abort", "request_id"))
            return [b"\x83" + head + b"\x91" * depth + b"\x00"]
        cls = rng.choice(list(p.MESSAGE_TYPES.values()))
        body = {"v": p.PROTOCOL_VERSION if rng.random() < 0.9 else rng.choice([0, 99, "6"]), "type": cls.TYPE}
        for f in dataclasses.fields(cls):
            if rng.random() < 0.95:
                body[f.name] = self.value(self.hints[cls][f.name])
        if cls is p.KVHello and rng.random() < 0.5:
            body["geometry"] = self.geometry
        if rng.random() < 0.05:
            body["extra"] = 1
        data = msgpack.packb(body, use_bin_type=True)
        if rng.random() < 0.05:
            data = data[: rng.randint(0, len(data))]
        frames = [data]
        if rng.random() < 0.05:  # many frames, some large
            frames += [rng.randbytes(rng.choice([0, 10, 4096, 2**20])) for _ in range(rng.randint(1, 20))]
        return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--check-every", type=int, default=2_000, help="fuzz messages between real requests")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    worker = engine_argv(model="tiny", num_kv_blocks=512, max_model_len=512)
    offline = LLM("tiny", num_kv_blocks=512, max_model_len=512)
    fuzzer = Fuzzer(args.seed, kv_geometry(offline.runner).to_dict())
    group = ProcessGroup()
    checks = wrong = refused = 0
    with local_cluster(worker, worker, group=group) as addr:
        names, pids = [c.name for c in group.children], [c.proc.pid for c in group.children]
        rss_before = {name: rss_mb(pid) for name, pid in zip(names, pids)}
        with Client(addr, timeout_s=60) as client:
            kv_addr = next(w["kv_addr"] for w in client.status()["workers"] if w["role"] == "decode")
        ctx = zmq.Context()
        # A client, a would-be worker (identity of a real one's heartbeat socket included), and
        # peers of the KV socket; a socket the far end dropped (oversized frame) is replaced.
        targets = [(addr, None), (addr, b"prefill-fuzz"), (addr, b"decode-fuzz/heartbeat"), (kv_addr, b"kv-fuzz"),
                   (kv_addr, None)]

        def connect(target):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            if target[1] is not None:
                sock.identity = target[1]
            sock.connect(target[0])
            return sock

        sockets = [connect(t) for t in targets]
        for i in tqdm(range(args.messages), desc="fuzz", unit="msg"):
            slot = fuzzer.rng.randrange(len(targets))
            try:
                sockets[slot].send_multipart(fuzzer.message(), flags=zmq.NOBLOCK)
            except zmq.Again:  # the far end is not taking more (or dropped us): that one is lost
                refused += 1
                sockets[slot].close(linger=0)
                sockets[slot] = connect(targets[slot])
            for sock in sockets:  # replies are read and dropped, so no queue fills
                while sock.poll(0):
                    sock.recv_multipart()
            if (i + 1) % args.check_every == 0:
                checks += 1
                prompt = [fuzzer.rng.randrange(1, 500) for _ in range(fuzzer.rng.randint(3, 80))]
                want = offline.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0].token_ids
                with Client(addr, timeout_s=60) as client:
                    got = client.generate(prompt, max_tokens=8, temperature=0)
                wrong += got.error is not None or got.token_ids != want
                if sum(c.proc.poll() is not None for c in group.children):
                    break
        ctx.destroy(linger=0)
        exited = [c.name for c in group.children if c.proc.poll() is not None]
        rss_after = {name: rss_mb(pid) for name, pid, c in zip(names, pids, group.children) if c.proc.poll() is None}
    print(f"{i + 1} messages ({refused} not taken by a full queue); processes exited: {exited or 'none'}; "
          f"real requests: {checks}, wrong or failed: {wrong}")
    print("resident memory, MB: " + ", ".join(f"{n} {rss_before[n]:.0f} -> {rss_after.get(n, float('nan')):.0f}"
                                              for n in names))
    result = {"messages": i + 1, "not_taken": refused, "seed": args.seed, "exited": exited, "checks": checks,
              "wrong_or_failed": wrong,
              "rss_mb_before": rss_before, "rss_mb_after": rss_after}
    print(f"wrote {write_result('fuzz_tiny_cpu', result)}")
    if exited or wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
