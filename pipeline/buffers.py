"""Host batch buffers that are reused once nothing references them (the CPU paths' outputs)."""
from __future__ import annotations

import threading

import torch


def _use_count(t: torch.Tensor) -> int | None:
    """How many tensors (views included) share ``t``'s storage, or None where this torch has
    no way to tell (a private but long-standing binding)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


class HostBuffers:
    """Batch buffers on the host that are reused once nobody holds them any more.

    A fresh 38 MB float32 batch (64 × 224² × 3) costs ~9,000 page faults each time (glibc maps
    blocks over 32 MB anew), a large share of the CPU path's time (``tricks bench loader``
    measures it). A buffer is handed out again only when no tensor but the pool's own
    shares its storage, so a batch the consumer keeps (a list of batches, a view, a tensor
    autograd saved, a ``.numpy()`` array) is never overwritten: it simply costs a fresh buffer.
    A buffer whose storage was moved to shared memory (sent through a ``torch.multiprocessing``
    queue: another process may still read it) leaves the pool for good. Not protected: a bare
    ``untyped_storage()`` object kept without any tensor (torch does not count those). CPU
    targets only: a pinned buffer may still be feeding an asynchronous copy after its tensors
    are gone (torch's pinned-memory cache tracks that itself)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free_count: dict[int, int] = {}  # id(buffer) → use count when unreferenced
        self.buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()  # two iterators of one loader may fill batches at once

    def _free(self, b: torch.Tensor) -> bool:
        return _use_count(b) == self._free_count[id(b)]

    def _drop(self, b: torch.Tensor) -> None:
        self.buffers = [x for x in self.buffers if x is not b]  # by identity: == is elementwise
        del self._free_count[id(b)]

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``shape``/``dtype`` tensor: a new view of a free buffer (so the
        caller's alias counts as a reference) or a new tensor."""
        with self._lock:
            for b in list(self.buffers):
                if b.untyped_storage().is_shared():  # another process may hold it: never again
                    self._drop(b)
                elif b.shape == shape and b.dtype == dtype and self._free(b):
                    return b.view(shape)
            b = torch.empty(shape, dtype=dtype)
            count = _use_count(b)
            if count is None:  # cannot tell when it is free: never reuse
                return b
            for x in list(self.buffers):  # free ones of another size (the size changed)
                if (x.shape != shape or x.dtype != dtype) and self._free(x):
                    self._drop(x)
            if len(self.buffers) < self.limit:
                self.buffers.append(b)
                self._free_count[id(b)] = count
            return b.view(shape)

    def clear(self) -> None:
        """Forget every buffer (those still held live on with their holders)."""
        with self._lock:
            self.buffers.clear()
            self._free_count.clear()
