"""CUDA graphs of the decode step: the forward pass through the LM head, captured once per
batch-size bucket and replayed with a handful of launches instead of hundreds.

A graph replays fixed kernels on fixed addresses, so every input is a view into the persistent
`DecodeInputs` buffer, padded to the bucket (padding rows store nothing), and every launch must
depend on shapes alone: the decode kernel fixes its split count per bucket and splits each
sequence by its own length on the device. All graphs share one memory pool, captured from the
largest bucket down, so they cost about one step's activations in all.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from kairos.engine.model import CausalLM
from kairos.engine.step_inputs import DecodeInputs

log = logging.getLogger("kairos")


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, and max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += range(16, min(max_batch, 64 + 1), 8)
    sizes += range(80, max_batch, 16)
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    def __init__(self, model: CausalLM, inputs: DecodeInputs):
        self.model = model
        self.inputs = inputs
        self.buckets = decode_buckets(inputs.max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, batch: int) -> int:
        """The smallest captured batch size that holds `batch` rows."""
        return self.buckets[bisect.bisect_left(self.buckets, batch)]

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):
            self.inputs.fill([], rows)  # all padding: valid inputs that store nothing
            self._forward(rows)  # compiles this shape's kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[rows] = self._forward(rows)
            self.graphs[rows] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch 1 to %d) in %.1f s, using %.0f MiB",
                 len(self.graphs), self.max_batch, time.perf_counter() - started,
                 (free_before - torch.cuda.mem_get_info()[0]) / 2**20)

    def _forward(self, rows: int) -> torch.Tensor:
        ids, positions, ctx = self.inputs.forward_args(rows)
        return self.model.compute_logits(self.model(ids, positions, ctx))

    def replay(self, rows: int) -> torch.Tensor:
        """Runs the bucket's graph on the inputs already filled for `rows` (a bucket size);
        returns its logits, valid until the next replay."""
        self.graphs[rows].replay()
        return self.logits[rows]
