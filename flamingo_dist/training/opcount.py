"""Count what a training step asks of the device: operators and host reads, per phase.

An *operator* is an aten call seen by a `TorchDispatchMode` (what would be a kernel launch on a
GPU), except views and metadata-only calls (`OpOverload.is_view`, `_unsafe_view`, detach/alias,
allocation of uninitialised memory, size/stride queries), which launch nothing. Composite
operators are counted as the CPU runs them: `F.rms_norm`, one fused kernel on a GPU, is five
operators here.

A *host read* is a point where the host must wait for the device's result: `aten::_local_scalar_dense`
(`.item()`, `float()`, `bool()` of a tensor), `aten::nonzero` (its output size depends on the
data), `aten::is_nonzero`, `aten::equal`, a copy from a CUDA tensor to the CPU, and
`Tensor.tolist()` / `Tensor.numpy()` (seen by a `TorchFunctionMode`: on the CPU they read memory
without an aten call). On a CPU-only machine the batch is already "on the device", so every read of
a tensor in the step counts; reads inside the data loader are outside the step (`paused`).

Phases are set by the caller (`with counter.phase("forward"): ...`); operators outside any named
phase count as `rest`. The counts are per thread that runs under the modes, including the autograd
engine's (it carries the modes over).
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# launch nothing: allocation of uninitialised memory, metadata, aliasing
_NO_KERNEL = {_aten.detach.default, _aten.alias.default, _aten._unsafe_view.default, _aten._reshape_alias.default,
              _aten.empty.memory_format, _aten.empty_strided.default,
              _aten.empty_like.default, _aten.lift_fresh.default, _aten.sym_size.int, _aten.sym_stride.int,
              _aten.sym_numel.default, _aten.sym_storage_offset.default, _aten.is_contiguous.default,
              _aten.set_.source_Storage_storage_offset, _aten.set_.source_Tensor, _aten.resize_.default,
              _aten.record_stream.default}
_READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.is_nonzero.default, _aten.equal.default}
_HOST_FUNCTIONS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _is_kernel(func) -> bool:
    return not (func in _NO_KERNEL or getattr(func, "is_view", False))


def _copies_to_host(func, args, kwargs) -> bool:
    """A copy from a CUDA tensor into host memory (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(cuda)`)."""
    if func is _aten._to_copy.default:
        src, dst = args[0], kwargs.get("device")
        return src.device.type == "cuda" and dst is not None and torch.device(dst).type == "cpu"
    if func is _aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type == "cuda"
    return False


class StepCounter:
    """Operators and host reads per phase; `where` keeps a short stack of every host read (to
    find them). Use as a context manager around the code to count."""

    def __init__(self, keep_stacks: bool = True):
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()
        self.op_names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.where: list[tuple[str, str, str]] = []  # (phase, what, stack)
        self.keep_stacks = keep_stacks
        self._phase_main = "rest"
        self._paused = False
        self._modes: list = []

    # ------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str):
        """Count what runs inside under `name` (the autograd engine's threads follow the caller's phase)."""
        before = self._phase_main
        self._phase_main = name
        try:
            yield
        finally:
            self._phase_main = before

    @contextlib.contextmanager
    def paused(self):
        """Nothing inside is counted (the data loader's work, say)."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    # ------------------------------------------------------------ recording
    def _read(self, what: str) -> None:
        if self._paused:
            return
        self.reads[self._phase_main] += 1
        if self.keep_stacks:
            frames = [f for f in traceback.extract_stack()[:-3] if "opcount.py" not in f.filename
                      and "torch/" not in f.filename.replace("\\", "/")][-4:]
            self.where.append((self._phase_main, what, " <- ".join(f"{f.filename.rsplit('/', 2)[-2:][-1]}:{f.lineno}"
                                                                    f" {f.name}" for f in reversed(frames))))

    def _op(self, func, args, kwargs) -> None:
        if self._paused:
            return
        if func in _READS:
            self._read(str(func.overloadpacket.__name__))
        elif _copies_to_host(func, args, kwargs):
            self._read("copy to host")
        if _is_kernel(func):
            self.ops[self._phase_main] += 1
            self.op_names[self._phase_main][str(func.overloadpacket.__name__)] += 1

    # ------------------------------------------------------------ modes
    def __enter__(self) -> "StepCounter":
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                counter._op(func, args, kwargs)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func not in _HOST_FUNCTIONS:
                    return func(*args, **(kwargs or {}))
                counter._read(func.__name__)
                with counter.paused():  # its copy to the host (on a GPU) is this same read
                    return func(*args, **(kwargs or {}))

        self._modes = [_Dispatch(), _Function()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    def summary(self) -> dict:
        return {"operators": dict(self.ops), "host_reads": dict(self.reads)}
