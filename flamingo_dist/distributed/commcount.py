"""Count the collectives a process runs: calls and bytes per operation and group size.

DeepSpeed sends its collectives through its own comm backend (`deepspeed.comm`'s `TorchBackend`,
which binds torch's functions when it is built), so wrapping `torch.distributed` alone misses
them; everything else (our trainer, megatron's tensor parallelism) calls `torch.distributed`
directly. Both are wrapped here; a DeepSpeed call that goes on to a wrapped torch function is
counted once (the outermost call). Bytes are those of this rank's input (all-reduce, broadcast:
the tensor; all-gather: this rank's shard; reduce-scatter: the whole input), whatever the
backend's algorithm puts on the wire.

    with CollectiveCounter() as counter:
        trainer.train_step()
    counter.calls[("all_gather_into_tensor", 2)], counter.bytes[...]
"""

from __future__ import annotations

import collections
import threading

import torch
import torch.distributed as dist

# torch.distributed functions -> which argument holds this rank's contribution (position, keyword):
# DeepSpeed passes them by keyword (`allgather_fn` calls all_gather_into_tensor(output_tensor=...,
# input_tensor=...)), so the name matters as much as the position
_TORCH = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "all_gather": (1, "tensor"),
          "all_gather_into_tensor": (1, "input_tensor"), "_all_gather_base": (1, "input_tensor"),
          "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
          "reduce_scatter": (1, "input_list"), "all_to_all_single": (1, "input"),
          "all_reduce_coalesced": (0, "tensors"), "reduce": (0, "tensor")}
# DeepSpeed's TorchBackend methods (deepspeed/comm/torch.py) -> the same
_DEEPSPEED = {"all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"), "broadcast": (0, "tensor"),
              "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
              "all_gather_coalesced": (1, "input_tensors"), "reduce_scatter_tensor": (1, "input_tensor"),
              "reduce_scatter": (1, "input_list"), "all_to_all_single": (1, "input"), "reduce": (0, "tensor")}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _group_size(args, kwargs) -> int:
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


class CollectiveCounter:
    """Context manager: counts every collective of this process inside it."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self._depth = threading.local()
        self._undo: list = []

    def _wrap(self, owner, name: str, arg: tuple[int, str]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._depth, "n", 0)
            if depth == 0:
                key = (name, _group_size(args, kwargs))
                counter.calls[key] += 1
                index, keyword = arg
                counter.bytes[key] += _nbytes(args[index] if len(args) > index else kwargs.get(keyword))
            counter._depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth.n = depth

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "CollectiveCounter":
        for name, arg in _TORCH.items():
            self._wrap(dist, name, arg)
        try:
            from deepspeed import comm as ds_comm

            backend = ds_comm.comm.cdb
        except (ImportError, AttributeError):
            backend = None
        if backend is not None:
            for name, arg in _DEEPSPEED.items():
                self._wrap(backend, name, arg)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo = []

    def summary(self) -> dict:
        return {f"{name}/{size}": {"calls": self.calls[(name, size)], "bytes": self.bytes[(name, size)]}
                for name, size in sorted(self.calls)}
