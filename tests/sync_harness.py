"""Count host-device synchronisations on the CPU, with the ``meta`` device standing in for CUDA.

The code under test takes its device path whenever ``device.type != "cpu"``; run on ``meta``
tensors under ``SyncCounter`` it shows every place where, on CUDA, the host would wait:

* a blocking host → device copy: ``_to_copy``/``copy_`` from a CPU tensor that is not both
  ``non_blocking`` and pinned. With CUDA present, pinned means ``is_pinned()``; on a CPU-only
  build nothing can be pinned, and a buffer counts as pinned only if ``pipeline.transfer``
  marked it as one it would pin (so the CPU run proves the code asks for a non-blocking copy
  from its pinned buffer; that the buffer really is pinned is checked on a GPU run);
* ``torch.tensor``/``torch.as_tensor`` straight onto the device (data built on the host,
  copied while blocking; these calls are invisible to a dispatch mode, so they are wrapped);
* a device → host read: ``item``/``bool``/``int`` (``_local_scalar_dense``), ``nonzero``,
  ``is_nonzero``, ``masked_select``, ``unique``, ``equal``, a device → CPU copy, indexing with
  a device bool mask, ``repeat_interleave`` without ``output_size``.

Meta tensors hold no values, so a device read cannot go on: it raises ``HostSync`` at once,
naming the op and the line of our code that asked for it. Blocking copies are recorded and the
run continues. What this cannot see: syncs inside CUDA kernels or libraries (cuDNN benchmark,
NCCL), the caching allocator's, and anything on a code path that only runs when
``device.type == "cuda"``. The ``gpu`` test with ``torch.cuda.set_sync_debug_mode("error")``
covers those.

Fused optimizers (the path on which ``torch.amp.GradScaler`` skips a step on the device instead
of reading its inf flag back) have no meta kernel: ``meta_fused`` lets one run on ``meta``.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tricks.pipeline.transfer import PINNED_STAND_IN

aten = torch.ops.aten

_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
          aten.masked_select.default, aten.equal.default, aten._unique2.default,
          aten.unique_consecutive.default, aten.unique_dim.default, aten._unique.default,
          aten.allclose.default}


_meta_kernels = None  # the Library holding our meta kernels; kept alive once registered


def meta_fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Let a fused SGD ``optimizer`` step on ``meta`` parameters: registers a no-op meta kernel
    for ``aten::_fused_sgd_`` (in place, nothing to compute without values) and lifts torch's
    check that refuses fused kernels on devices other than CUDA, CPU, … Returns ``optimizer``."""
    global _meta_kernels
    if _meta_kernels is None:
        lib = torch.library.Library("aten", "IMPL")
        for overload in ("_fused_sgd_", "_fused_sgd_.tensor_lr"):
            lib.impl(overload, lambda *args, **kwargs: None, "Meta")
        _meta_kernels = lib
    optimizer._need_device_dtype_check_for_fused = False
    return optimizer


class HostSync(RuntimeError):
    """A device → host read in the code under test."""


def _is_dev(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _pinned(t: torch.Tensor) -> bool:
    if torch.cuda.is_available():
        return t.is_pinned()
    return bool(getattr(t, PINNED_STAND_IN, False))


def _where() -> str:
    """The innermost frame of our own code (not torch's, not this file's)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" not in f and not f.endswith("sync_harness.py"):
            return f"{'/'.join(f.split('/')[-2:])}:{frame.lineno} {frame.line}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as s: …``; then ``s.events`` lists (kind, op, where) for every
    blocking host → device copy; a device → host read raises ``HostSync``."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str, str]] = []
        self.copies = 0  # non-blocking host → device copies (the allowed kind)

    def __enter__(self):
        self._tensor, self._as_tensor = torch.tensor, torch.as_tensor
        orig_tensor, orig_as_tensor = self._tensor, self._as_tensor

        def tensor(*a, **k):
            if "device" in k and torch.device(k["device"]).type != "cpu":
                self.events.append(("h2d", "torch.tensor", _where()))
            return orig_tensor(*a, **k)

        def as_tensor(data, *a, **k):
            dev = k.get("device", a[1] if len(a) > 1 else None)
            if dev is not None and torch.device(dev).type != "cpu" and not _is_dev(data):
                self.events.append(("h2d", "torch.as_tensor", _where()))
            return orig_as_tensor(data, *a, **k)

        torch.tensor, torch.as_tensor = tensor, as_tensor
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._tensor, self._as_tensor
        return super().__exit__(*exc)

    def _copy(self, src, dst_device, non_blocking: bool, op: str) -> None:
        if not isinstance(src, torch.Tensor):
            return
        if src.device.type == "cpu" and dst_device.type != "cpu":
            if non_blocking and _pinned(src):
                self.copies += 1
            else:
                self.events.append(("h2d", op, _where()))
        elif src.device.type != "cpu" and dst_device.type == "cpu":
            raise HostSync(f"device → host copy ({op}) at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and any(_is_dev(a) for a in args):
            raise HostSync(f"device read {func} at {_where()}")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None \
                and _is_dev(args[0]):
            raise HostSync(f"repeat_interleave without output_size at {_where()}")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            for i in args[1]:
                if _is_dev(i) and i.dtype == torch.bool:
                    raise HostSync(f"{func} with a device bool mask at {_where()}")
        if func is aten._to_copy.default:
            dst = kwargs.get("device") or args[0].device
            self._copy(args[0], torch.device(dst), kwargs.get("non_blocking", False), "to")
        elif func is aten.copy_.default:
            nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self._copy(args[1], args[0].device, nb, "copy_")
        return func(*args, **kwargs)
