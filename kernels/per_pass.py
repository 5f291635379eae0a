"""Work a kernel derives from a forward pass's attention metadata, done once per pass.

A forward pass calls attention once per layer with the very same metadata tensors, so what
depends on them alone (FlashInfer's plan; the PyTorch path's decode layout, rotation and rows
to store) is made at the first layer and reused by the others. An entry knows the tensors it
was made for by weak reference (a new tensor is never mistaken for one of them, even one that
took a dead one's id, and a finished engine's metadata are not kept alive), and their version
counters, so that an in-place write since invalidates it. Inference tensors keep no version
counter; the engine hands every pass new ones (views of its input buffers).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class PassMemo:
    """One value per key, reused while its metadata tensors and parameters stay the same.

    An entry is replaced as one tuple, so threads sharing a memo (engines in one process) may
    each recompute a value but never take one made for other tensors."""

    def __init__(self):
        self._entries: dict[Hashable, tuple] = {}

    def get(self, key: Hashable, tensors: tuple[torch.Tensor, ...], params: tuple, make: Callable[[], T]) -> T:
        """make()'s value for these tensors and params: computed now, unless made for the very
        same ones (unwritten since) under this key last."""
        versions = tuple(_version(t) for t in tensors)
        entry = self._entries.get(key)
        if (entry is not None and entry[1] == params and entry[2] == versions
                and all(ref() is t for ref, t in zip(entry[0], tensors, strict=True))):
            return entry[3]
        value = make()
        self._entries[key] = (tuple(weakref.ref(t) for t in tensors), params, versions, value)
        return value
