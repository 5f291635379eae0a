"""Where a step's GPU time goes: its kernels by kind, and the GPU's idle time between them.

A few steps run under torch.profiler, which records every kernel, copy and memset the GPU runs
(those of CUDA graph replays included) with its device timestamps. Their durations are summed
by kind, and the time in the steps' span that no kernel covers is the GPU idling: launch gaps
between a graph's kernels, or a host that did not keep the GPU fed. The profiler adds a little
host work per step, so idle time under it is an upper bound of the unprofiled step's.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from kairos.bench.common import synchronize

# A kernel's kind, by fragments of its lower-cased name; the first kind that matches wins, and
# the rest is "other" (elementwise ops, the embedding gather, reductions).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("_decode_kernel", "_merge_kernel", "_prefill_kernel", "batchdecode", "batchprefill")),
    ("sampling", ("_radix_pass_kernel", "_softmax_parts_kernel", "_finish_kernel", "softmax", "argmax", "sort",
                  "distribution")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitkreduce", "_skinny_linear_kernel")),
    ("norm, RoPE, SiLU", ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rope_store_kv_kernel")),
)
DEVICE_CATEGORIES = {"kernel": None, "gpu_memcpy": "copies", "gpu_memset": "copies"}
TOP_KERNELS = 12


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KINDS if any(f in lowered for f in fragments)), "other")


def device_events(trace: dict) -> list[tuple[str, str, float, float]]:
    """(kind, name, start us, duration us) of each kernel, copy and memset in a Chrome trace."""
    events = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in DEVICE_CATEGORIES:
            continue
        kind = DEVICE_CATEGORIES[e["cat"]] or kind_of(e["name"])
        events.append((kind, e["name"], float(e["ts"]), float(e["dur"])))
    return events


def breakdown(events: list[tuple[str, str, float, float]], steps: int) -> dict | None:
    """Per step: the GPU's span from its first event's start to its last one's end, the time
    some event covers (busy) and none does (idle), and the time and count by kind and by the
    costliest kernels. None without events."""
    if not events:
        return None
    ordered = sorted(events, key=lambda e: e[2])
    busy = 0.0
    covered_to = float("-inf")
    for _, _, start, duration in ordered:  # union of the intervals: kernels may overlap
        end = start + duration
        if end > covered_to:
            busy += end - max(start, covered_to)
            covered_to = end
    span = covered_to - ordered[0][2]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for kind, name, _, duration in events:
        by_kind[kind] += duration
        by_name[name][0] += duration
        by_name[name][1] += 1
    per_step_ms = 1e-3 / steps  # us over all steps -> ms per step
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {
        "steps": steps,
        "span_ms": span * per_step_ms,
        "busy_ms": busy * per_step_ms,
        "idle_ms": (span - busy) * per_step_ms,
        "events_per_step": len(events) / steps,
        "ms_by_kind": {kind: t * per_step_ms for kind, t in sorted(by_kind.items(), key=lambda item: -item[1])},
        "top_kernels": [{"name": name[:100], "kind": kind_of(name), "ms": t * per_step_ms, "calls": n / steps}
                        for name, (t, n) in top],
    }


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict | None:
    """Runs step() `steps` times under the profiler and breaks down the GPU time they took."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return breakdown(device_events(trace), steps)


def describe(result: dict, floors_ms: dict[str, float]) -> str:
    """One line: span, busy and idle per step, then each kind's time, as a multiple of its
    floor where floors_ms has one (matmul: the weights it reads; attention: the KV)."""
    kinds = []
    for kind, ms in result["ms_by_kind"].items():
        floor = floors_ms.get(kind)
        kinds.append(f"{kind} {ms:.3f}" + (f" ({ms / floor:.2f}x its floor)" if floor else ""))
    return (f"GPU span {result['span_ms']:.3f} ms/step, {result['events_per_step']:.0f} kernels and copies, "
            f"idle {result['idle_ms']:.3f} ms; " + ", ".join(kinds))
