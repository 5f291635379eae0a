"""Moving a request's KV blocks between workers.

The unit is the request's blocks across all layers. On the wire they are raw frames after a
`KVData` header, each frame the K or V of one layer for a run of `blocks_per_frame` blocks, in
the order (k/v, layer, run). Both ends derive that layout from the geometry they agreed on in
the handshake and the header, so the receiver checks every frame's size before it writes a byte.

On a GPU the prefill side gathers the blocks into pinned host memory on a side stream (the
compute stream goes on), and the decode side copies each frame through a small pinned staging
buffer onto its own side stream, straight into the blocks it reserved. On a CPU the frames are
views of the cache copy and are written straight into the reserved blocks. The decode worker
writes on a thread of its own (`KVWriter.submit`): a 1000-token Llama-3-8B transfer is 128 MiB,
tens of milliseconds of copying that would otherwise stall every decode step behind it.

Two workers on the same GPU skip the host and the socket: the prefill worker exports its KV
cache once, in the handshake, as a CUDA IPC handle (`export_cache`); the decode worker maps it
(`open_peer_cache`), and a transfer's header then names the prefill-side blocks instead of
carrying frames, which the decode side copies GPU to GPU (`KVWriter.submit_copy`). TCP loopback
carries about 2.4 GB/s, and one H100 prefills KV faster than that.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import math
import queue
import socket
import threading
import warnings
from pathlib import Path

import torch

from kairos.engine.model_runner import ModelRunner
from kairos.transport.protocol import KVGeometry

DEFAULT_FRAME_BYTES = 8 * 2**20


def kv_geometry(runner: ModelRunner) -> KVGeometry:
    """The geometry of this engine's KV cache, as the handshake and registration state it."""
    cfg = runner.model_config
    model = (f"{cfg.path.name}:{cfg.architecture}:h{cfg.hidden_size}:v{cfg.vocab_size}"
             f":i{cfg.intermediate_size}:q{cfg.num_heads}")
    return KVGeometry(model, str(runner.dtype).removeprefix("torch."), runner.block_size, cfg.num_layers,
                      cfg.num_kv_heads, cfg.head_dim)


def host_id() -> str:
    """This machine in this boot: a CUDA IPC handle means something only there."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_cache(runner: ModelRunner) -> dict | None:
    """What a decode worker on the same GPU needs to map this worker's KV cache (CUDA IPC), for
    the handshake; None off the GPU. Plain values only: handles are bytes, never pickled."""
    cache = runner.kv_cache
    if cache.device.type != "cuda":
        return None
    _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = cache.untyped_storage()._share_cuda_()
    return {"host": host_id(), "device_uuid": device_uuid(cache.device), "handle": handle, "storage_bytes": size,
            "storage_offset": offset, "ref_counter_handle": ref_handle, "ref_counter_offset": ref_offset,
            "event_handle": event_handle, "event_sync_required": event_sync,
            "tensor_offset": cache.storage_offset(), "shape": list(cache.shape)}


EXPORT_FIELDS = {"host": (str,), "device_uuid": (str,), "handle": (bytes,), "storage_bytes": (int,),
                 "storage_offset": (int,), "ref_counter_handle": (bytes,), "ref_counter_offset": (int,),
                 "event_handle": (bytes, type(None)), "event_sync_required": (bool,), "tensor_offset": (int,),
                 "shape": (list,)}


def open_peer_cache(export: dict, runner: ModelRunner, geometry: KVGeometry) -> torch.Tensor:
    """A prefill worker's KV cache (see `export_cache`) mapped into this process, to copy its
    blocks GPU to GPU. Raises ValueError when it cannot be: another host or GPU, no GPU here, or
    an export that does not describe a cache of this geometry."""
    for name, kinds in EXPORT_FIELDS.items():
        if not isinstance(export.get(name), kinds):
            raise ValueError(f"bad CUDA IPC export: {name} is not {' or '.join(k.__name__ for k in kinds)}")
    if not all(isinstance(n, int) and n > 0 for n in export["shape"]):
        raise ValueError("bad CUDA IPC export: shape is not a list of positive ints")
    cache = runner.kv_cache
    if cache.device.type != "cuda":
        raise ValueError("this worker's KV cache is not on a GPU")
    if export["host"] != host_id() or export["device_uuid"] != device_uuid(cache.device):
        raise ValueError("the prefill worker's KV cache is on another host or GPU")
    shape = export["shape"]
    if len(shape) != cache.dim() or shape[:2] + shape[3:] != list(cache.shape[:2] + cache.shape[3:]):
        raise ValueError(f"the exported KV cache has shape {shape}, which does not match {list(cache.shape)}")
    dtype = getattr(torch, geometry.dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    if (export["tensor_offset"] + math.prod(shape)) * elem > export["storage_bytes"]:
        raise ValueError("the exported KV cache is larger than the memory it names")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            cache.device.index, export["handle"], export["storage_bytes"], export["storage_offset"],
            export["ref_counter_handle"], export["ref_counter_offset"], export["event_handle"],
            export["event_sync_required"])
    except (RuntimeError, TypeError) as e:  # the driver refused the handle, or torch its form
        raise ValueError(f"could not map the prefill worker's KV cache: {e}") from None
    stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return torch.empty(0, dtype=dtype, device=cache.device).set_(storage, export["tensor_offset"], shape, stride)


def blocks_per_frame(geometry: KVGeometry, max_frame_bytes: int) -> int:
    return max(1, max_frame_bytes // geometry.bytes_per_block_layer)


def frame_runs(num_blocks: int, per_frame: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_frame, num_blocks)) for start in range(0, num_blocks, per_frame)]


def _buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor that keeps the tensor alive as long as
    the view (ZeroMQ holds it until the bytes are on the wire)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    raw = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    raw.owner = t
    return memoryview(raw).cast("B")


class PinnedPool:
    """Pinned host memory for outgoing KV, pinned once and lent out in ranges. Pinning runs at
    about 2 GB/s (measured on an H200 host: 250 ms for the 512 MiB of KV of a 4096-token
    Llama-3-8B prompt, twenty times the copy into it), so a transfer that pinned a buffer of
    its own stalled the prefill loop for as long. A range goes back once ZeroMQ has let go of
    the frames sent from it (`release` with the send's tracker)."""

    ALIGN = 4096

    def __init__(self, nbytes: int, pin: bool = True):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, length): sorted, coalesced
        self.releasing: list[tuple[object, int, int]] = []  # (tracker, offset, length)

    def take(self, nbytes: int) -> int | None:
        """The offset of a free range of nbytes (first fit), or None if none is free."""
        self._reclaim()
        need = -(-nbytes // self.ALIGN) * self.ALIGN
        for i, (offset, length) in enumerate(self.free):
            if length >= need:
                self.free[i:i + 1] = [(offset + need, length - need)] if length > need else []
                return offset
        return None

    def release(self, offset: int, nbytes: int, tracker=None) -> None:
        """Gives a range back, at once or when `tracker` (a ZeroMQ send's) says it is done."""
        need = -(-nbytes // self.ALIGN) * self.ALIGN
        if tracker is not None and not tracker.done:
            self.releasing.append((tracker, offset, need))
            return
        i = bisect.bisect(self.free, (offset, 0))
        self.free.insert(i, (offset, need))
        if i + 1 < len(self.free) and offset + need == self.free[i + 1][0]:  # joins the next range
            self.free[i:i + 2] = [(offset, need + self.free[i + 1][1])]
        if i > 0 and sum(self.free[i - 1]) == offset:  # and the previous one
            self.free[i - 1:i + 1] = [(self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])]

    def _reclaim(self) -> None:
        done = [r for r in self.releasing if r[0].done]
        self.releasing = [r for r in self.releasing if not r[0].done]
        for _, offset, length in done:
            self.release(offset, length)


class OutgoingKV:
    """A request's blocks copied out of the cache, becoming frames once the copy is done. On a
    GPU the copy goes into a range of `pool` when one is free, else into memory pinned for it."""

    def __init__(self, runner: ModelRunner, block_ids: list[int], stream: torch.cuda.Stream | None,
                 pool: PinnedPool | None = None, written: torch.cuda.Event | None = None):
        self.pool, self.offset = pool, None
        if stream is None:
            self.host = runner.kv_cache[:, :, torch.tensor(block_ids)]  # [2, layers, n, bs, heads, dim], a copy
            self.done = None
            return
        cache = runner.kv_cache
        shape = (*cache.shape[:2], len(block_ids), *cache.shape[3:])
        nbytes = math.prod(shape) * cache.element_size()
        self.offset = pool.take(nbytes) if pool is not None else None
        if self.offset is not None:
            self.host = pool.buffer[self.offset:self.offset + nbytes].view(cache.dtype).view(shape)
        else:
            self.host = torch.empty(shape, dtype=cache.dtype, pin_memory=True)
        # After the prefill that wrote them: its event where given (the copy then need not wait
        # for a step running now), else all the work queued so far.
        if written is not None:
            stream.wait_event(written)
        else:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Nothing here waits for the GPU: the caller queues every ready transfer's copy first.
            ids = torch.tensor(block_ids, pin_memory=True).to(runner.device, non_blocking=True)
            self.host.copy_(cache[:, :, ids], non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def wait(self) -> None:
        """Until the copy to host memory is complete (milliseconds: host-link bandwidth)."""
        if self.done is not None:
            self.done.synchronize()

    def release(self, tracker=None) -> None:
        """The transfer is over: its pool range goes back once `tracker` (of the send) is done."""
        if self.offset is not None:
            self.pool.release(self.offset, self.nbytes, tracker)
            self.offset = None

    def frames(self, per_frame: int) -> list[memoryview]:
        runs = frame_runs(self.host.shape[2], per_frame)
        return [_buffer(self.host[kv, layer, a:b]) for kv in range(2)
                for layer in range(self.host.shape[1]) for a, b in runs]

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


class KVWriter:
    """Writes received frames into reserved blocks of the local cache: at once (`write`), or
    in the background (`submit`, then `finished`) while the engine goes on stepping."""

    STAGING_SLOTS = 2

    def __init__(self, runner: ModelRunner, max_frame_bytes: int):
        self.runner = runner
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.geometry = kv_geometry(runner)
        self.max_frame_bytes = max_frame_bytes
        self.on_gpu = runner.device.type == "cuda"
        if self.on_gpu:
            self.stream = torch.cuda.Stream()
            # Bounded pinned staging: frames take turns through a few fixed slots.
            self.staging = [torch.empty(max_frame_bytes, dtype=torch.uint8, pin_memory=True)
                            for _ in range(self.STAGING_SLOTS)]
            self.slot_free = [None] * self.STAGING_SLOTS
        self._next_slot = 0

    def expected_frames(self, num_blocks: int, per_frame: int) -> list[tuple[int, int, int, int]]:
        """(k/v, layer, first block, end block) of every frame, in wire order."""
        runs = frame_runs(num_blocks, per_frame)
        return [(kv, layer, a, b) for kv in range(2) for layer in range(self.geometry.num_layers) for a, b in runs]

    def check(self, frames: list, num_blocks: int, per_frame: int) -> str | None:
        """None if the frames are exactly what this transfer should carry, else what is wrong."""
        if per_frame < 1 or per_frame * self.geometry.bytes_per_block_layer > self.max_frame_bytes:
            return (f"blocks_per_frame {per_frame} is outside "
                    f"1..{self.max_frame_bytes // self.geometry.bytes_per_block_layer}")
        layout = self.expected_frames(num_blocks, per_frame)
        if len(frames) != len(layout):
            return f"expected {len(layout)} KV frames, got {len(frames)}"
        per_block = self.geometry.bytes_per_block_layer
        for frame, (_, _, a, b) in zip(frames, layout):
            if len(frame.buffer) != (b - a) * per_block:
                return f"a KV frame has {len(frame.buffer)} bytes, expected {(b - a) * per_block}"
        return None

    def submit(self, key: str, frames: list, block_ids: list[int], per_frame: int) -> None:
        """Queues a write of checked frames for the writer thread; `finished` reports it. The
        blocks must stay reserved until then, and the frames alive (the job holds them)."""
        block_ids = list(block_ids)
        self._queue(key, lambda: self.write(frames, block_ids, per_frame))

    def submit_copy(self, key: str, source: torch.Tensor, source_ids: list[int], block_ids: list[int]) -> None:
        """Queues a copy of blocks `source_ids` of a peer's mapped cache (`open_peer_cache`) into
        blocks `block_ids` of this one, reported by `finished` like a write."""
        source_ids, block_ids = list(source_ids), list(block_ids)
        self._queue(key, lambda: self.copy_from(source, source_ids, block_ids))

    def check_copy(self, source: torch.Tensor, source_ids: list[int] | None, frames: list,
                   num_blocks: int) -> str | None:
        """None if a copy header names exactly the transfer's blocks of the peer's cache."""
        if source_ids is None or frames:
            return "a CUDA IPC transfer names its blocks and carries no frames"
        if len(source_ids) != num_blocks:
            return f"expected {num_blocks} KV blocks, the transfer names {len(source_ids)}"
        if any(not 0 <= b < source.shape[2] for b in source_ids):
            return f"a KV block id is outside the prefill worker's 0..{source.shape[2] - 1}"
        return None

    def _queue(self, key: str, job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_jobs, name="kv-writer", daemon=True)
            self._thread.start()
        self._jobs.put((key, job))

    def finished(self) -> list[tuple[str, str | None]]:
        """(key, error or None) of every submitted write completed since the last call."""
        done = []
        while not self._finished.empty():
            done.append(self._finished.get())
        return done

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _write_jobs(self) -> None:
        while (queued := self._jobs.get()) is not None:
            key, job = queued
            try:
                job()
                error = None
            except Exception as e:  # a failed copy fails its request; the worker goes on
                error = f"writing the KV failed: {e}"
            self._finished.put((key, error))

    def write(self, frames: list, block_ids: list[int], per_frame: int) -> None:
        """Copies checked frames into the blocks; on GPU the copies are complete on return."""
        g, cache = self.geometry, self.runner.kv_cache
        shape = (g.block_size, g.num_kv_heads, g.head_dim)
        if self.on_gpu:
            self._after_compute()
        with torch.cuda.stream(self.stream) if self.on_gpu else contextlib.nullcontext():
            all_ids = torch.tensor(block_ids, device=cache.device)  # used on the side stream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers: they are only read
            sources = [torch.frombuffer(frame.buffer, dtype=torch.uint8) for frame in frames]
        for src, (kv, layer, a, b) in zip(sources, self.expected_frames(len(block_ids), per_frame)):
            ids = all_ids[a:b]
            if not self.on_gpu:
                cache[kv, layer].index_copy_(0, ids, src.view(cache.dtype).view(b - a, *shape))
                continue
            slot = self._next_slot
            self._next_slot = (slot + 1) % self.STAGING_SLOTS
            if self.slot_free[slot] is not None:
                self.slot_free[slot].synchronize()  # its previous frame has left for the GPU
            staged = self.staging[slot][: src.numel()]
            staged.copy_(src)
            with torch.cuda.stream(self.stream):
                dev = staged.to(cache.device, non_blocking=True).view(cache.dtype).view(b - a, *shape)
                cache[kv, layer].index_copy_(0, ids, dev)
                self.slot_free[slot] = torch.cuda.Event()
                self.slot_free[slot].record(self.stream)
        if self.on_gpu:
            # Decode steps run on the default stream: the blocks must be whole before then.
            self.stream.synchronize()

    def _after_compute(self) -> None:
        """Orders this transfer after the compute work queued so far. Reserved blocks may have
        been freed by a sequence aborted while an overlapped step was still writing its token
        into them."""
        self.stream.wait_stream(torch.cuda.default_stream(self.runner.device))

    def copy_from(self, source: torch.Tensor, source_ids: list[int], block_ids: list[int]) -> None:
        """Copies blocks of a peer's cache on this GPU into ours; complete on return. The peer
        holds its blocks until our ack, and wrote them before it sent the header."""
        cache = self.runner.kv_cache
        self._after_compute()
        with torch.cuda.stream(self.stream):
            src = torch.tensor(source_ids, device=cache.device)
            dst = torch.tensor(block_ids, device=cache.device)
            cache.index_copy_(2, dst, source.index_select(2, src))
        self.stream.synchronize()
